"""Make `terraform init` find the google provider STAND-IN (tests/fakes/google_provider/provider.py) instead
of downloading hashicorp/google, which cannot be downloaded here. Tests only.

    env["TF_CLI_CONFIG_FILE"] = str(install(tmp_path / "tf-mirror"))

writes an unpacked filesystem mirror (registry.terraform.io/hashicorp/google/6.50.0/linux_amd64/
terraform-provider-google_v6.50.0: a script that execs this Python on the stand-in) and a CLI config that
installs hashicorp/google from it and everything else directly (terraform_data needs nothing).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from tests.fakes.google_provider.provider import VERSION

ROOT = Path(__file__).resolve().parents[3]
PLATFORM = "linux_amd64"


def install(where: Path) -> Path:
    """The mirror and CLI config under `where`; returns the CLI config file's path."""
    where = Path(where).resolve()
    target = where / "mirror" / "registry.terraform.io" / "hashicorp" / "google" / VERSION / PLATFORM
    target.mkdir(parents=True, exist_ok=True)
    exe = target / f"terraform-provider-google_v{VERSION}"
    exe.write_text(
        "#!/bin/sh\n"
        f"cd {shlex.quote(str(ROOT))} && exec {shlex.quote(sys.executable)} -m tests.fakes.google_provider.provider "
        '"$@"\n'
    )
    exe.chmod(0o755)
    config = where / "terraformrc"
    config.write_text(
        "provider_installation {\n"
        f'  filesystem_mirror {{\n    path    = "{where / "mirror"}"\n    include = ["hashicorp/google"]\n  }}\n'
        '  direct {\n    exclude = ["hashicorp/google"]\n  }\n'
        "}\n"
    )
    return config
