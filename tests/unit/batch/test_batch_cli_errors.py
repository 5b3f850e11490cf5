"""``stemagent batch`` on bad input (issue 21 hostile check): each ends in one line naming the option and
the value, with a non-zero exit; a scheduler that does not answer is named too; an input that cannot be read
is a task's returned failure (Dask retries only what may pass)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stemagent.agent.app.cli import app
from stemagent.errors import InputError, StemAgentError

pytest.importorskip("distributed")

from stemagent.agent.app.batch import check_scheduler_address, open_client  # noqa: E402 - after the skip: Dask is the 'batch' extra
from stemagent.agent.app.batch_worker import TaskFailure, TaskSpec, analyse  # noqa: E402


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["batch", *args])
    return result.exit_code, " ".join(result.output.split())


def test_batch_names_the_bad_value_and_exits_non_zero(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    one = tmp_path / "files"
    one.mkdir()
    (one / "a.dm3").write_bytes(b"not read: the options fail first")
    out = str(tmp_path / "out")
    code, text = _invoke(str(empty), "--out", out)
    assert code == 2 and "INPUTS=" in text and str(empty) in text and "hold no run log" in text
    code, text = _invoke(str(tmp_path / "nowhere"), "--out", out)
    assert code == 2 and "nowhere" in text and "no such file or folder" in text
    code, text = _invoke(str(one), "--out", out, "--stages", "segment,segmant")
    assert code == 2 and "--stages='segmant'" in text
    for address in ("notanaddress", "http://host:8786", "tcp://host:99999"):
        code, text = _invoke(str(one), "--out", out, "--scheduler", address)
        assert code == 2 and f"--scheduler='{address}'" in text and "scheduler address" in text, text
    (tmp_path / "a-file").write_text("")
    code, text = _invoke(str(one), "--out", str(tmp_path / "a-file"))
    assert code == 2 and "--out=" in text and "a-file" in text and "is a file" in text


def test_scheduler_addresses_dask_reads_pass_and_one_that_does_not_answer_is_named() -> None:
    assert check_scheduler_address(" tcp://10.0.0.5:8786 ") == "tcp://10.0.0.5:8786"
    assert check_scheduler_address("10.0.0.5:8786") == "10.0.0.5:8786"  # Dask takes host:port as tcp
    with pytest.raises(InputError, match="--scheduler"):
        check_scheduler_address("tcp://host")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StemAgentError, match=rf"--scheduler='tcp://127.0.0.1:{port}': no Dask scheduler answered"):
        with open_client(f"tcp://127.0.0.1:{port}", None, connect_timeout_s=1.0):
            pass


def test_an_unreadable_input_is_a_returned_failure_not_an_exception(tmp_path: Path) -> None:
    pytest.importorskip("rsciio")
    bad = tmp_path / "broken.dm3"
    bad.write_bytes(b"\x00\x00\x00\x03not a DigitalMicrograph file")
    result = analyse(TaskSpec(path=str(bad), kind="file", stages=("segment",), start=0, stop=4))
    assert isinstance(result, TaskFailure) and "broken.dm3" in result.error
