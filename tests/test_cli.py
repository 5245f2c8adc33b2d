"""cli.py's shared pieces, in-process: the flag types and the writable-folder probe."""
import argparse
import sys
from pathlib import Path

import pytest

import cli
from cli import UserError


def test_positive_int_and_finite_float_refuse_their_edges():
    assert cli.positive_int("1") == 1
    for text in ("0", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            cli.positive_int(text)
    assert cli.finite_float("1e3") == 1000.0 and cli.finite_float("-0.5") == -0.5
    for text in ("nan", "inf", "-inf", "1e999"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite number"):
            cli.finite_float(text)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_folder_that_takes_no_file_is_refused_before_work(tmp_path):
    # /proc exists but no file can be created in it, whoever runs the test (root too)
    with pytest.raises(UserError, match="--out /proc/self is not writable"):
        cli.ensure_writable_dir(Path("/proc/self"), "--out")
    assert cli.ensure_writable_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone
