"""library_log.py: other libraries' output lands in a log file, cnclip's stays on the terminal."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, threading, warnings
    from cnclip._common.library_log import library_log, output_to

    with library_log(sys.argv[2]):
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
        warnings.warn("a library's warning")
        from transformers.utils import logging as hf_logging
        hf_logging.get_logger("transformers.modeling_utils").warning("transformers speaking")
    print("before", flush=True)
    with output_to(sys.argv[1], "lane 0"):
        print("a print")
        sys.stderr.write("a stderr write\\n")
        os.write(1, b"a C-level write\\n")
        thread = threading.Thread(target=lambda: print("a thread's print", flush=True))
        thread.start()
        thread.join()
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        logging.warning("a log record")
        from tqdm import tqdm
        for _ in tqdm(range(3), desc="a tqdm bar"):
            pass
    print("after", flush=True)
    logging.warning("cnclip after the block")
    sys.stderr.write("stderr after\\n")
""")


def test_output_and_log_records_land_in_the_files_not_the_terminal(tmp_path):
    lane_log, run_log = tmp_path / "download.log", tmp_path / "libraries.log"
    lane_log.write_text("an earlier attempt\n")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(lane_log), str(run_log)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before\nafter\n"
    # Restored after each block (logging's own default handler, installed by the lane's record, writes
    # to stderr once the lane's block is over).
    assert done.stderr == "WARNING:root:cnclip after the block\nstderr after\n"
    lane = lane_log.read_text()
    assert lane.startswith("an earlier attempt\n== ")  # appended, never truncated
    assert lane.splitlines()[1].endswith(" lane 0")
    for said in ("a print", "a stderr write", "a C-level write", "a thread's print", "a child process",
                 "a log record", "a tqdm bar", "3/3"):
        assert said in lane, said
    logged = run_log.read_text().splitlines()
    said = [line.split(" ", 2)[2] for line in logged if line[:2] == "20"]  # after the timestamp
    assert said[0] == "WARNING root: No pretrained weights loaded for model 'x'. Model initialized randomly."
    assert said[1].startswith("WARNING py.warnings: <string>:") and said[1].endswith("UserWarning: a library's warning")
    assert said[2:] == ["WARNING transformers.modeling_utils: transformers speaking"]
