"""Progress output is copy-paste safe: a join command's CURVE keys use [ ] and other markup
characters of rich, and must come out exactly, on one line."""
import io

from rich.console import Console

from testbed.progress import Progress

KEYS_LINE = ("FEDGE_NODE_KEY='a[b]c[/]d[bold]e' python -m node --connect tcp://127.0.0.1:5 --name pi-0 "
             "--server-key '[x]y[/x].z' " + "-" * 120)


def test_messages_print_exactly_as_given_on_one_line():
    buf = io.StringIO()
    p = Progress({"pi-0": "rpi4"}, console=Console(file=buf, width=60), live=False)
    p.message("waiting for pi-0 to join: " + KEYS_LINE)
    p.message("fidelity: [not markup]", style="yellow")
    lines = buf.getvalue().splitlines()
    assert lines == ["waiting for pi-0 to join: " + KEYS_LINE, "fidelity: [not markup]"]
