"""Progress output: a live bar on a terminal, plain lines in a redirected log."""

from gmpo_megatron.config import load_config
from gmpo_megatron.data.tokenizer import build_task_tokenizer
from gmpo_megatron.models.presets import load_hf_config
from gmpo_megatron.run_log import RunLog


def test_a_redirected_log_gets_a_line_every_few_steps_not_carriage_return_frames(tmp_path, capsys):
    cfg = load_config("examples/moe/tiny_cpu.yaml", [f"output_dir={tmp_path}", "train.steps=40",
                                                     "logging.tensorboard=false", "logging.dashboard=false"])
    log = RunLog(tmp_path, cfg, load_hf_config("tiny-qwen3-moe"), build_task_tokenizer(), start_step=0,
                 enabled=True)
    for step in range(40):
        log.log({"step": step, "reward_mean": 0.5, "loss": 0.1, "time_step_s": 0.2, "skipped": 0})
    log.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("gmpo step")]
    assert lines[0].startswith("gmpo step 1/40") and lines[-1].startswith("gmpo step 40/40")
    assert 2 <= len(lines) <= 21, lines  # about 20 lines per run, whatever its length
    assert "reward 0.500" in lines[-1] and "loss 0.1000" in lines[-1]
