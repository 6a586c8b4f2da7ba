"""A Hugging Face hub cache laid out as huggingface_hub writes it (datasets--org--name/refs, snapshots/<commit>),
so the hub-dataset path runs offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE) against the real huggingface_hub client."""

from pathlib import Path

CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: small
  data_files:
  - split: train
    path: small/*.jsonl
---
# a test dataset
"""


def make_hub_dataset(
    cache: Path, repo: str, commit: str, files: dict[str, bytes], branch: str = "main", card: str = CARD
) -> Path:
    """Write files (path in the repo -> bytes) as the snapshot of `commit`, with `branch` pointing at it."""
    root = cache / ("datasets--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    for name, data in {"README.md": card.encode(), **files}.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    return snap


def offline(monkeypatch, cache: Path) -> None:
    """Point the (already imported) huggingface_hub at `cache`, offline."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
