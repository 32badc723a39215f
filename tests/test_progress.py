"""Rank 0's progress report: a tqdm bar on a terminal, lines in logs, nothing when the quickstart is quiet."""

import io
import json
import re

from reallm.algorithms.base import StepProgress
from reallm.apps.quickstart import run


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal(capsys):
    term = Terminal()
    p = StepProgress(3, start_s=0.0, stream=term)
    for step in (1, 2, 3):
        p.update(step, {"loss": 1.0 / step, "num_tokens": 100.0}, now_s=float(step))
    shown = term.getvalue()
    assert "3/3" in shown and "loss=0.3333" in shown and "tok/s=100" in shown and "eta" in shown
    assert capsys.readouterr().out == ""  # no log lines besides the bar


def test_lines_in_logs_and_reward_for_ppo(capsys):
    p = StepProgress(4, first_step=1, start_s=0.0, stream=io.StringIO())  # resumed after step 1
    for step in (2, 3, 4):
        p.update(step, {"reward": 0.5, "num_tokens": 10.0}, now_s=10.0 * step)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines] == ["2/4", "3/4", "4/4"]  # steps 10 s apart: a line each
    assert "reward=0.5" in lines[0] and "tokens_per_s=1" in lines[1]
    assert lines[0].endswith("eta ?") and lines[1].endswith("eta 10s") and lines[2].endswith("eta 0s")


def test_quickstart_prints_progress_unless_quiet(tmp_path, tiny_assets, capfd):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(12)))
    args = [f"model.path={tiny_assets['llama']}", f"dataset.train_path={data}", "dataset.train_bs_n_seqs=4",
            "allocation_mode=d1p1m1", "n_gpus_per_node=1", "cluster=cpu", "dataset.max_seqlen=32",
            "model.gradient_checkpointing=False", "total_train_epochs=1", "save_freq_steps=null",
            f"output_dir={tmp_path}", "experiment_name=progress"]
    capfd.readouterr()
    assert run("sft", [*args, "trial_name=shown"]) == 0
    out = capfd.readouterr().out  # the worker's stderr is not a terminal here: lines on stdout
    assert re.search(r"^step 1/3 loss=\S+ tokens_per_s=\S+ elapsed \d+s eta \?$", out, re.M), out
    assert re.search(r"^step 3/3 .* eta 0s$", out, re.M), out
    assert run("sft", [*args, "trial_name=quiet"], quiet=True) == 0
    printed = capfd.readouterr()
    assert not re.search(r"step \d+/3", printed.out + printed.err), printed
