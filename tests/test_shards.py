"""shards.py's writer: a shard appears under its final name whole or not at all. A write that fails or is killed
mid-way (here: a file-size limit hit after the header, in a child process) leaves no file under that name, and an
older shard already there stays as it was."""
import signal
import subprocess
import sys

import numpy as np
import pytest

import shards
from conftest import REPO, script_env

TOKENS = 50_000  # 100 kB of tokens: the 16 kB limit stops the write well after its start
LIMIT = 16_384
WRITER = f"""
import resource, signal, sys
import numpy as np
sys.path.insert(0, {str(REPO)!r})
import shards
# Python ignores SIGXFSZ, so a write() past the limit raises OSError (EFBIG); with the default action the kernel
# kills the process in the middle of the write instead (nothing of Python runs after it).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[2] == "fail" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
shards.write_shard(sys.argv[1], np.arange({TOKENS}) % 50257)
"""


def write_in_child(path, how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(path), how], capture_output=True, text=True,
                          timeout=120, env=script_env())


@pytest.mark.parametrize("how", ["fail", "kill"])
def test_interrupted_shard_write_leaves_nothing_under_the_final_name(tmp_path, how):
    path = tmp_path / "train_000000.bin"
    proc = write_in_child(path, how)
    if how == "fail":
        assert proc.returncode == 1 and "File too large" in proc.stderr and str(path) in proc.stderr, proc.stderr
        assert list(tmp_path.iterdir()) == []  # the partial temporary file is removed too
    else:
        assert proc.returncode == -signal.SIGXFSZ, (proc.returncode, proc.stderr)  # killed while writing
    assert not path.exists()


@pytest.mark.parametrize("how", ["fail", "kill"])
def test_interrupted_rewrite_leaves_the_previous_shard_whole(tmp_path, how):
    path = tmp_path / "train_000000.bin"
    old = np.arange(100, dtype=np.uint16)
    sha = shards.write_shard(path, old)
    assert write_in_child(path, how).returncode != 0
    assert shards.read_shard_header(path) == len(old) and shards.file_sha256(path) == sha
