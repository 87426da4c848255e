"""Progress bars: a redrawn bar on a terminal, whole lines at an interval in a log."""
import io
import time

from vllama_jax import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_stream_gets_whole_lines_at_the_interval(monkeypatch):
    monkeypatch.setenv("VLLAMA_PROGRESS_INTERVAL", "0.05")
    log = io.StringIO()
    for _ in progress.progress_bar(range(2000), desc="work", unit="it", file=log):
        time.sleep(0.0001)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # One line at start, a few on the way (>= 0.2 s of work at 0.05 s), the final state; not 2000.
    assert 3 <= len(lines) < 200, lines
    assert all(line.startswith("work:") for line in lines)
    assert "2000/2000" in lines[-1]


def test_cleared_bar_keeps_its_last_line_in_a_log(monkeypatch):
    monkeypatch.setenv("VLLAMA_PROGRESS_INTERVAL", "1000")
    log = io.StringIO()
    with progress.progress_bar(total=5, desc="tensors", file=log, leave=False) as bar:
        for _ in range(5):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "5/5" in lines[-1], lines


def test_terminal_stream_gets_a_redrawn_bar():
    term = _Terminal()
    for _ in progress.progress_bar(range(50), desc="work", file=term, mininterval=0):
        pass
    assert term.getvalue().count("\r") > 10


def test_write_is_a_plain_line_in_a_log():
    log = io.StringIO()
    progress.write("[train] step 3: loss=1.0", file=log)
    assert log.getvalue() == "[train] step 3: loss=1.0\n"


def test_bad_interval_is_named(monkeypatch):
    monkeypatch.setenv("VLLAMA_PROGRESS_INTERVAL", "often")
    try:
        progress.progress_bar(total=1, file=io.StringIO())
    except ValueError as e:
        assert "VLLAMA_PROGRESS_INTERVAL='often'" in str(e)
    else:
        raise AssertionError("no error for a non-numeric interval")


def test_machine_facts_name_what_moves_numerics():
    from vllama_jax.machine import describe, machine_facts

    facts = machine_facts()
    for key in ("cpu_model", "cores", "usable_cores", "jax", "jaxlib", "backend", "devices", "xla_flags"):
        assert key in facts, key
    line = describe(facts)
    assert facts["jax"] in line and facts["cpu_model"] in line and "XLA_FLAGS" in line
