"""d2norm.engine.output_lock: one training per OUTPUT_DIR; a killed holder leaves no stale lock."""
import os
import signal
import subprocess
import sys

import pytest

from d2norm.engine.output_lock import OutputDirBusyError, output_dir_lock


def test_a_busy_output_dir_is_refused_with_the_holder_named(tmp_path):
    with output_dir_lock(str(tmp_path / "out")):
        with pytest.raises(OutputDirBusyError, match=rf"OUTPUT_DIR {tmp_path / 'out'} is in use .*pid {os.getpid()}"):
            with output_dir_lock(str(tmp_path / "out")):
                pass
    with output_dir_lock(str(tmp_path / "out")):  # released at the end of the block
        pass


def test_a_killed_holder_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from d2norm.engine.output_lock import output_dir_lock\n"
         f"with output_dir_lock({str(tmp_path)!r}):\n"
         "    print('locked', flush=True)\n"
         "    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusyError, match=f"pid {holder.pid}"):
            with output_dir_lock(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_dir_lock(str(tmp_path)):
        pass
