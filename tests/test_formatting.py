import pytest

from actfleet.formatting import human_bytes


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (71_234_567, "71.2 MB"),
        (5 * 10**12, "5.0 TB"),
        (7 * 10**15, "7000.0 TB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text
