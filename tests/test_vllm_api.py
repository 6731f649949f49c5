"""The vLLM surface the plugin uses (openrlhf_bonesoup/vllm_api.py), against the installed vLLM: every
internal resolves, the version is one the project checked, a moved internal is one line, and vLLM's own
engine parser turns `evaluate ... -- FLAGS` into engine options."""

import json
import subprocess
import sys

import pytest

from openrlhf_bonesoup import vllm_api
from openrlhf_bonesoup.errors import BoneSoupError


def test_every_internal_the_plugin_uses_resolves_on_the_installed_vllm():
    assert vllm_api.version() in vllm_api.CHECKED  # a new vLLM: run the tests, then add it to CHECKED
    vllm_api.check()


def test_a_moved_internal_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(vllm_api.INTERNALS, "run_server_worker", "vllm.entrypoints.gone.entry:run_server_worker")
    with pytest.raises(BoneSoupError, match=r"^vLLM \S+ has no vllm\.entrypoints\.gone\.entry\.run_server_worker "):
        vllm_api.check()
    monkeypatch.setitem(vllm_api.INTERNALS, "run_server_worker", "vllm.entrypoints.llm:no_such_name")
    with pytest.raises(BoneSoupError, match="no vllm.entrypoints.llm.no_such_name"):
        vllm_api.get("run_server_worker")


def test_a_method_argument_vllm_dropped_is_one_line(monkeypatch):
    monkeypatch.setitem(vllm_api.METHOD_ARGS, "GPUModelRunner.reload_weights", ("weights_iterator", "weights_dir"))
    with pytest.raises(BoneSoupError, match=r"GPUModelRunner\.reload_weights takes no weights_dir;"):
        vllm_api.check()


def test_engine_flags_are_parsed_by_vllms_own_parser():
    options = vllm_api.engine_options(["--tensor-parallel-size", "2", "--dtype", "float32", "--max-num-seqs=4"])
    assert options == {"tensor_parallel_size": 2, "dtype": "float32", "max_num_seqs": 4}
    assert vllm_api.engine_options([]) == {}
    with pytest.raises(BoneSoupError, match="^vLLM flags: unrecognized arguments: --tensor-parallelism"):
        vllm_api.engine_options(["--tensor-parallelism", "2"])
    with pytest.raises(BoneSoupError, match="^vLLM flag --model: evaluate sets it"):
        vllm_api.engine_options(["--model=other"])


def test_evaluate_refuses_a_bad_engine_flag_in_one_line_before_loading_anything(tiny, tmp_path):
    from openrlhf_bonesoup import objectives, soup
    from openrlhf_bonesoup.coefficients import backbone_matrix

    folder = tmp_path / "soup"
    specs = objectives.parse_objectives(f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    soup.init_soup(folder, objectives=specs, beta=0.7, matrix=backbone_matrix(0.7, 2), sft=str(tiny["policy"]))
    for j in range(2):
        soup.register_backbone(folder, j, status="trained", checkpoint=tiny["policy"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"input": "hi"}) + "\n")
    base = [sys.executable, "-m", "openrlhf_bonesoup.cli", "evaluate", "--soup_dir", str(folder), "--grid", "3"]
    base += ["--prompts", str(prompts), "--output", str(tmp_path / "out")]
    for flags, line in [
        (
            ["--", "--tensor-parallelism", "8"],
            "openrlhf-bonesoup: error: vLLM flags: unrecognized arguments: --tensor-parallelism 8\n",
        ),
        (
            ["--eval.backend", "transformers", "--", "--max-num-seqs", "4"],
            "openrlhf-bonesoup: error: vLLM engine flags (after --) need the vLLM backend; "
            "here transformers generates\n",
        ),
    ]:
        run = subprocess.run([*base, *flags], capture_output=True, text=True, timeout=300)
        assert (run.returncode, run.stderr.splitlines()[-1] + "\n") == (2, line), run.stderr
        assert run.stderr.count("\n") == 1, run.stderr
        assert not (tmp_path / "out").exists()  # nothing merged, nothing written
