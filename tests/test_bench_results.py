"""bench/_results.py: a benchmark's rerun rewrites its block and keeps the hand-written reading."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _results import write  # noqa: E402


def test_a_rerun_keeps_the_reading_and_says_which_run_it_was_written_for(tmp_path):
    f = tmp_path / "RESULTS-x.md"
    write(f, "# x\ndate: 2026-01-02 03:04\nratio 1.5x")
    assert f.read_text() == "# x\ndate: 2026-01-02 03:04\nratio 1.5x\n"
    f.write_text(f.read_text() + "\n## Reading (by hand)\n\n- 1.5x: the slots are full\n")

    write(f, "# x\ndate: 2026-02-03 04:05\nratio 1.7x\n")
    text = f.read_text()
    assert text.startswith("# x\ndate: 2026-02-03 04:05\nratio 1.7x\n\n## Reading (by hand)\n")
    assert "(written for the run of 2026-01-02 03:04; the block above is from a later run)" in text
    assert text.endswith("- 1.5x: the slots are full\n")
    assert "1.5x" not in text.split("## Reading")[0]

    write(f, "# x\ndate: 2026-03-04 05:06\nratio 1.6x\n")  # the note is not stacked
    again = f.read_text()
    assert again.count("written for the run of") == 1
    assert again.split("## Reading")[1] == text.split("## Reading")[1]


def test_the_reading_mark_keeps_everything_below_it(tmp_path):
    f = tmp_path / "RESULTS-y.md"
    f.write_text("old block 2025-05-05\n<!-- READING (hand-written) -->\n## Reading\n- a\n")
    write(f, "new block")
    text = f.read_text()
    assert text.startswith("new block\n\n<!-- READING (hand-written) -->\n## Reading\n")
    assert "old block" not in text
    assert "the run of 2025-05-05" in text and text.endswith("- a\n")
