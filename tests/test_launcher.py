"""The drop-in launcher's argument handling against OpenRLHF's real train_ppo_ray parser.

These tests stop OpenRLHF's main right after its parser (the launcher's own --dry_run path, `resolve`), or
`apply` a plan up to the point where Ray would start. Real launches, the post-training hand-off to the merge
included, are tests/test_launch.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ray.runtime_env.runtime_env import _merge_runtime_env

from openrlhf_bonesoup import soup
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.integration import launcher, worker

OURS = ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "1"]
RUN_OPENRLHF = launcher._run_openrlhf  # the real one, also where a test stands in for train()


def openrlhf_argv(tiny, *extra):
    argv = ["--actor.model_name_or_path", str(tiny["policy"]), "--reward.clip_range", "-5", "5"]
    return argv + ["--ds.zero_stage", "3", "--rollout.batch_size", "8", *extra]


def run_main(argv, capsys):
    code = launcher.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def openrlhf_args(argv):
    """OpenRLHF's own parser + hierarchize on argv (and the launcher's settings, when one is installed),
    stopped right after."""

    class Stop(Exception):
        pass

    seen = {}

    def stop(args):
        seen["args"] = args
        raise Stop

    with launcher._hierarchize_then(stop), pytest.raises(Stop):
        RUN_OPENRLHF(argv)
    return seen["args"]


def test_our_flags_are_removed_and_the_rest_parsed_by_openrlhf(tiny):
    rms = f"{tiny['rm_llama']},{tiny['rm_gpt2']}"
    upstream = openrlhf_argv(tiny, "--reward.model_name_or_path", rms)
    plan, args = launcher.resolve(upstream[:2] + OURS + upstream[2:] + ["--soup_dir", "/tmp/s"])
    assert plan["openrlhf_argv"] == upstream
    assert args.reward.clip_range == [-5.0, 5.0] and args.ds.zero_stage == 3  # OpenRLHF's parser
    assert args.bonesoup["weights"] == pytest.approx([0.3, 0.7])  # row 1 of B(0.7)
    assert [o["name"] for o in args.bonesoup["objectives"]] == ["rm_llama", "rm_gpt2"]
    assert args.reward.model_name_or_path == rms and args.reward.remote_url is None  # the in-cluster actor
    assert plan["backbone_index"] == 1 and plan["soup_dir"] == "/tmp/s"
    assert args.ckpt.output_dir == plan["output_dir"] == str(Path.cwd() / "ckpt")  # upstream's default, absolute
    assert plan["runtime_env"]["worker_process_setup_hook"] == worker.SETUP_HOOK
    assert json.loads(plan["runtime_env"]["env_vars"][worker.CONFIG_ENV]) == args.bonesoup


def test_dotted_aliases_mean_the_same(tiny):
    upstream = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    plain, _ = launcher.resolve(upstream + OURS)
    dotted, _ = launcher.resolve(
        upstream + ["--reward.combiner", "bonesoup", "--reward.beta", "0.7", "--reward.backbone_index", "1"]
    )
    assert plain == dotted


def test_any_model_routes_every_objective_to_the_reward_actors(tiny, tmp_path, capsys):
    (tmp_path / "rules.py").write_text("def reward_func(queries, prompts, labels):\n    return [0.0] * len(queries)\n")
    (tmp_path / "objectives.yaml").write_text(
        f"- {{name: helpful, path: {tiny['rm_llama']}, normalize: running}}\n"
        "- {name: harmless, url: 'http://10.0.0.9:5000/get_reward'}\n"
        "- {name: format, path: rules.py}\n"
    )
    argv = openrlhf_argv(tiny, "--objectives", str(tmp_path / "objectives.yaml"), "--reward_combiner", "linear")
    argv += ["--reward_weights", "0.5,0.25,0.25", "--dry_run"]
    code, out, _ = run_main(argv, capsys)
    plan = json.loads(out)
    assert code == 0 and plan["bonesoup"]["route"] == worker.ROUTE_ACTORS
    assert plan["reward.remote_url"] is None  # no rollout process scores anything
    assert plan["reward.model_name_or_path"]  # upstream builds and initialises the reward group
    assert [o["kind"] for o in plan["bonesoup"]["objectives"]] == ["model", "http", "function"]
    assert plan["bonesoup"]["objectives"][0]["normalize"] == "running"
    assert plan["bonesoup"]["weights"] == [0.5, 0.25, 0.25]


def test_endpoints_and_light_functions_alone_go_through_reward_func(tiny, tmp_path):
    (tmp_path / "rules.py").write_text("def reward_func(queries, prompts, labels):\n    return [0.0] * len(queries)\n")
    specs = [{"url": "http://10.0.0.9:5000/get_reward"}, {"path": str(tmp_path / "rules.py")}]
    (tmp_path / "o.json").write_text(json.dumps(specs))
    _, args = launcher.resolve(openrlhf_argv(tiny, "--objectives", str(tmp_path / "o.json"), *OURS))
    assert args.bonesoup["route"] == worker.ROUTE_REWARD_FUNC
    assert args.reward.remote_url == launcher.REWARD_FUNC_FILE  # upstream splits it into a list later
    # A reward_func that loads a model says so: then it runs on the reward GPUs, not beside vLLM.
    (tmp_path / "o.json").write_text(json.dumps([specs[0], {**specs[1], "gpu": True}]))
    _, args = launcher.resolve(openrlhf_argv(tiny, "--objectives", str(tmp_path / "o.json"), *OURS))
    assert args.bonesoup["route"] == worker.ROUTE_ACTORS and args.reward.remote_url is None


def test_upstreams_remote_url_names_objectives_after_the_reward_models(tiny, tmp_path):
    """OpenRLHF's recipes pass reward functions (and endpoints) as --reward.remote_url a.py,b.py: with a
    combiner they are objectives, after --reward.model_name_or_path's models, named as --objectives names
    them; the launch then routes them as any objective (our reward_func file, or the reward actors)."""
    for name in ("length", "format"):
        (tmp_path / f"{name}.py").write_text(
            "def reward_func(queries, prompts, labels):\n    return [0.0] * len(queries)\n"
        )
    files = f"{tmp_path / 'length.py'},{tmp_path / 'format.py'}"
    _, args = launcher.resolve(openrlhf_argv(tiny, "--reward.remote_url", files, *OURS))
    specs = args.bonesoup["objectives"]
    assert [(s["kind"], s["path"], s["name"]) for s in specs] == [
        ("function", str(tmp_path / "length.py"), "length"),
        ("function", str(tmp_path / "format.py"), "format"),
    ]
    assert args.bonesoup["route"] == worker.ROUTE_REWARD_FUNC
    assert args.reward.remote_url == launcher.REWARD_FUNC_FILE and args.reward.model_name_or_path is None

    url = "http://127.0.0.1:5000/get_reward"
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", str(tiny["rm_llama"]), *OURS)
    _, args = launcher.resolve([*argv, "--reward.remote_url", f"{tmp_path / 'length.py'},{url}"])
    specs = args.bonesoup["objectives"]
    assert [s["kind"] for s in specs] == ["model", "function", "http"]
    assert [s.get("path") or s["url"] for s in specs] == [str(tiny["rm_llama"]), str(tmp_path / "length.py"), url]
    assert args.bonesoup["route"] == worker.ROUTE_ACTORS and args.reward.remote_url is None
    assert args.bonesoup["weights"] is not None and len(args.bonesoup["weights"]) == 3


def test_an_objectives_file_of_models_feeds_upstreams_reward_group(tiny, tmp_path):
    (tmp_path / "o.json").write_text(json.dumps([{"path": str(tiny["rm_gpt2"])}, {"path": str(tiny["rm_llama"])}]))
    _, args = launcher.resolve(openrlhf_argv(tiny, "--objectives", str(tmp_path / "o.json"), *OURS))
    # train() initialises the reward group only when this is set
    assert args.reward.model_name_or_path == f"{tiny['rm_gpt2']},{tiny['rm_llama']}"
    # ... and upstream would start the GAE critic from its first entry, a GPT-2 on another tokenizer:
    # the launcher starts it from the policy instead.
    assert args.critic.model_name_or_path == str(tiny["policy"])


def test_an_explicit_critic_is_kept(tiny, tmp_path):
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_gpt2']},{tiny['rm_llama']}", *OURS)
    _, args = launcher.resolve(argv + ["--critic.model_name_or_path", str(tiny["rm_llama"])])
    assert args.critic.model_name_or_path == str(tiny["rm_llama"])


def test_help_prints_ours_and_openrlhfs(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for flag in ("--reward_combiner", "--reward.beta", "--soup_dir", "--merge_preferences", "--dry_run"):
        assert flag in out
    for flag in ("--actor.model_name_or_path", "--reward.remote_url", "--vllm.num_engines"):
        assert flag in out  # OpenRLHF's real parser


def test_dry_run_prints_the_plan(tiny, capsys):
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}", *OURS)
    code, out, _ = run_main(argv + ["--dry_run"], capsys)
    assert code == 0
    assert json.loads(out)["bonesoup"]["weights"] == pytest.approx([0.3, 0.7])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--reward_combiner", "bonesoup", "--beta", "0.7"], "needs --backbone_index"),
        (["--beta", "0.7"], "--reward_combiner is required"),
        ([*OURS, "--train.agent_func_path", "agent.py"], "OpenRLHF builds no reward model group for agents"),
        ([*OURS, "--algo.dynamic_filtering_enable"], "include models scored later by the reward actors"),
        ([*OURS, "--eval.dataset", "e.jsonl"], "--eval.dataset: OpenRLHF evaluates with rollout-side rewards only"),
        ([*OURS, "--ds.lora.rank", "8", "--ds.tensor_parallel_size", "2"], "does not gather tensor-parallel shards"),
        ([*OURS, "--ds.lora.rank", "8", "--ds.load_in_4bit"], "4-bit base's packed bytes"),
        ([*OURS, "--objectives", "x.yaml"], "give the objectives once"),
        ([*OURS, "--objectives", "x.yaml", "--reward.remote_url", "r.py"], "give the objectives once"),
        (["--reward_combiner", "linear", "--reward_weights", "0.5,0.5", "--soup_dir", "s"], "needs --reward_combiner"),
        ([*OURS, "--merge_output", "m"], "--merge_output needs"),
        ([*OURS, "--merge_preferences", "0,1"], "needs --soup_dir"),
        ([*OURS, "--soup_dir", "s", "--merge_preferences", "0.2,0.2,0.6"], "3 entries but there are 2 objectives"),
        ([*OURS, "--soup_dir", "s", "--merge_grid", "1"], "grid"),
        (["--reward_combiner", "bonesoup", "--beta", "0.2", "--backbone_index", "0"], "beta must lie"),
    ],
)
def test_bad_launches_are_one_line_errors_before_anything_runs(tiny, tmp_path, monkeypatch, capsys, extra, match):
    monkeypatch.chdir(tmp_path)
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}", *extra)
    code, out, err = run_main(argv, capsys)
    assert code == 2 and match in err and "\n" not in err
    assert not (tmp_path / "s").exists()  # no manifest written


def test_evaluation_with_running_statistics_is_refused(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o.yaml").write_text(
        "- {url: 'http://10.0.0.9:5000/get_reward', normalize: running}\n- {url: 'http://10.0.0.9:5001/get_reward'}\n"
    )
    argv = openrlhf_argv(tiny, "--objectives", "o.yaml", *OURS, "--eval.dataset", "e.jsonl")
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "never see the trainer's running statistics" in err and "\n" not in err


def test_dynamic_filtering_runs_on_the_reward_func_route_with_fixed_normalisation(tiny, tmp_path, capsys):
    (tmp_path / "fixed.yaml").write_text("- {url: 'http://10.0.0.9:5000/get_reward', normalize: {mean: 1, std: 2}}\n"
                                         "- {url: 'http://10.0.0.9:5001/get_reward'}\n")  # fmt: skip
    flags = ["--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0.2", "0.8"]
    flags += ["--rollout.n_samples_per_prompt", "4"]
    plan, args = launcher.resolve(openrlhf_argv(tiny, "--objectives", str(tmp_path / "fixed.yaml"), *OURS, *flags))
    assert plan["bonesoup"]["route"] == "reward_func" and args.algo.dynamic_filtering_enable
    assert args.reward.remote_url == launcher.REWARD_FUNC_FILE  # upstream's filter needs a rollout-side reward

    (tmp_path / "running.yaml").write_text("- {url: 'http://10.0.0.9:5000/get_reward', normalize: running}\n"
                                           "- {url: 'http://10.0.0.9:5001/get_reward'}\n")  # fmt: skip
    code, _, err = run_main(openrlhf_argv(tiny, "--objectives", str(tmp_path / "running.yaml"), *OURS, *flags), capsys)
    assert code == 2 and "never see the trainer's running statistics" in err and "\n" not in err


def test_an_agent_launch_takes_the_reward_func_route(tiny, tmp_path):
    (tmp_path / "o.yaml").write_text(
        "- {url: 'http://10.0.0.9:5000/get_reward'}\n- {url: 'http://10.0.0.9:5001/get_reward'}\n"
    )
    agent = ["--train.agent_func_path", str(tmp_path / "agent.py")]
    plan, args = launcher.resolve(openrlhf_argv(tiny, "--objectives", str(tmp_path / "o.yaml"), *OURS, *agent))
    assert plan["bonesoup"]["route"] == "reward_func" and args.train.agent_func_path == agent[1]


def test_an_unknown_flag_is_openrlhfs_parser_error_in_one_line(tiny, capsys):
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", str(tiny["rm_llama"]), "--no_such_flag", *OURS)
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: unrecognized arguments: --no_such_flag (" in err  # no usage block


# --- pre-flight: objectives and checkpoints from their config.json, before Ray ------------------------


def test_a_causal_lm_given_as_reward_model_is_refused_before_ray(tiny, tmp_path, started, capsys):
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['policy']}", *OURS)
    argv += ["--soup_dir", str(tmp_path / "soup")]
    code, out, err = run_main([*argv, "--dry_run"], capsys)
    assert code == 2 and "\n" not in err and "has no value head `score.weight`" in err and out == ""
    ours, rest = launcher._parse(argv)  # the launch itself: refused in our plan, before Ray starts
    with pytest.raises(BoneSoupError, match="has no value head"):
        launcher.plan(ours, openrlhf_args(rest), argv, rest)
    assert started == [] and not (tmp_path / "soup").exists()  # no Ray, no manifest


@pytest.mark.parametrize(
    "objective, extra, match",
    [
        ({"path": "./ckpt/rm_typo"}, [], "does not exist"),
        ({"path": "CLASSIFIER"}, [], "has 2 labels"),
        ({"path": "CLASSIFIER", "label": 1, "attn_implementation": "flash_attention_2"}, ["--ds.ring_attn_size", "2"],
         "with --ds.ring_attn_size > 1"),
    ],
)  # fmt: skip
def test_objectives_that_cannot_load_are_refused_by_the_dry_run(tiny, tmp_path, capsys, objective, extra, match):
    objective = {k: str(tiny["classifier"]) if v == "CLASSIFIER" else v for k, v in objective.items()}
    (tmp_path / "o.json").write_text(json.dumps([{"path": str(tiny["rm_llama"])}, objective]))
    argv = openrlhf_argv(tiny, "--objectives", str(tmp_path / "o.json"), *OURS, *extra, "--dry_run")
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "\n" not in err and match in err


def test_a_missing_local_actor_is_refused_and_a_local_one_recorded_absolute(
    tiny, tmp_path, started, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny["policy"], tmp_path / "sft")
    rms = ["--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}", *OURS, "--soup_dir", "soup"]
    code, _, err = run_main(["--actor.model_name_or_path", "./sfft", *rms, "--dry_run"], capsys)
    assert code == 2 and "--actor.model_name_or_path ./sfft does not exist" in err
    argv = ["--actor.model_name_or_path", "sft", *rms]
    launch_until_ray(argv)
    assert soup.read_soup(tmp_path / "soup")["sft"] == str(tmp_path / "sft")


# --- runtime_env under `ray job submit --runtime-env-json` ----------------------------------------


def test_runtime_env_merges_with_a_submitted_jobs_runtime_env(monkeypatch):
    job = {"working_dir": "/code", "env_vars": {"NCCL_DEBUG": "INFO", "HF_HOME": "/hf"}}
    monkeypatch.setenv(launcher.JOB_CONFIG_ENV, json.dumps({"runtime_env": job}))
    ours = launcher.runtime_env({"objectives": []})
    assert _merge_runtime_env(job, ours) is not None  # Ray's own merge: no conflicting key
    merged = _merge_runtime_env(job, ours)
    assert merged["env_vars"]["NCCL_DEBUG"] == "INFO"  # the job's value
    assert merged["worker_process_setup_hook"] == worker.SETUP_HOOK and worker.CONFIG_ENV in merged["env_vars"]
    monkeypatch.delenv(launcher.JOB_CONFIG_ENV)
    assert _merge_runtime_env(job, launcher.runtime_env({})) is None  # upstream's env_vars would conflict


def test_runtime_env_and_a_jobs_setup_hook(monkeypatch):
    job = {"runtime_env": {"worker_process_setup_hook": worker.SETUP_HOOK}}
    monkeypatch.setenv(launcher.JOB_CONFIG_ENV, json.dumps(job))
    assert "worker_process_setup_hook" not in launcher.runtime_env({})  # already the job's
    monkeypatch.setenv(launcher.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"worker_process_setup_hook": "x.y"}}))
    with pytest.raises(BoneSoupError, match="Bone Soup needs its own"):
        launcher.runtime_env({})


# --- side effects: the soup manifest, Ray, and the post-training hand-off ---------------------------


class Started(Exception):
    """Where Ray would start: train()'s first line, after every check of OpenRLHF's main."""


@pytest.fixture
def started(monkeypatch):
    """Record the runtime_env instead of starting Ray, and stop there (train() would then use that cluster)."""
    envs = []

    def start(env, local):
        envs.append(env)
        raise Started

    monkeypatch.setattr(launcher, "_start_ray", start)
    return envs


def launch_until_ray(argv):
    """`apply` the launch's plan: OpenRLHF's main runs, stopped where Ray would start (`started`)."""
    launch, _ = launcher.resolve(argv)
    with pytest.raises(Started):
        launcher.apply(launch)


def test_a_launch_registers_the_backbone_in_the_soup(tiny, tmp_path, started):
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    argv += ["--ckpt.output_dir", str(tmp_path / "ckpt1"), *OURS, "--soup_dir", str(tmp_path / "soup")]
    launch_until_ray(argv)
    manifest = soup.read_soup(tmp_path / "soup")
    assert manifest["beta"] == 0.7
    np.testing.assert_allclose(manifest["matrix"], [[0.7, 0.3], [0.3, 0.7]])
    assert manifest["sft"] == str(tiny["policy"])
    assert [o["name"] for o in manifest["objectives"]] == ["rm_llama", "rm_gpt2"]
    entry = manifest["backbones"][1]
    assert entry["status"] == "launched" and entry["launch_args"] == argv
    assert entry["output_dir"] == str(tmp_path / "ckpt1") and "checkpoint" not in entry
    assert manifest["backbones"][0] is None
    assert started[0]["worker_process_setup_hook"] == worker.SETUP_HOOK

    other = [a if a != "0.7" else "0.8" for a in argv]  # same soup folder, another beta: refused
    with pytest.raises(BoneSoupError, match="beta"):
        launcher.apply(launcher.resolve(other)[0])
    assert len(started) == 1  # Ray is not started for a refused launch


def test_single_objective_runs_form_a_rewarded_soup(tiny, tmp_path, started):
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    argv += ["--reward_combiner", "single", "--objective", "0", "--soup_dir", str(tmp_path / "soup")]
    launch_until_ray(argv)
    manifest = soup.read_soup(tmp_path / "soup")
    assert manifest["beta"] == 1.0 and manifest["matrix"] == [[1.0, 0.0], [0.0, 1.0]]
    assert manifest["backbones"][0]["status"] == "launched"


def test_a_failing_upstream_check_after_parsing_leaves_the_soup_untouched(tiny, tmp_path, started):
    """OpenRLHF's main checks its args after parsing (train_ppo_ray.py, before train()): soup.json and Ray wait
    for those checks, so a launch they refuse leaves no `launched` entry behind."""
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    argv += [*OURS, "--soup_dir", str(tmp_path / "soup")]
    launch, _ = launcher.resolve([*argv, "--algo.advantage.estimator", "rloo"])  # our plan has nothing against it
    with pytest.raises(AssertionError, match="requires n_samples_per_prompt > 1"):  # upstream's own check
        launcher.apply(launch)
    assert started == [] and not (tmp_path / "soup").exists()

    launch_until_ray(argv)  # an entry exists: a later refused launch does not change it
    before = (tmp_path / "soup" / soup.MANIFEST).read_text()
    with pytest.raises(AssertionError, match="requires n_samples_per_prompt > 1"):
        launcher.apply(launcher.resolve([*argv, "--algo.advantage.estimator", "rloo"])[0])
    assert (tmp_path / "soup" / soup.MANIFEST).read_text() == before and len(started) == 1


def test_relaunching_a_trained_backbone_keeps_it_until_a_new_checkpoint_is_registered(tiny, tmp_path, started, capsys):
    from openrlhf_bonesoup import hook
    from openrlhf_bonesoup.cli import main as cli

    soup_dir = tmp_path / "soup"
    argv = openrlhf_argv(tiny, "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    argv += ["--reward_combiner", "bonesoup", "--beta", "0.7", "--soup_dir", str(soup_dir)]
    for j in (0, 1):  # a trained soup: each backbone launched, then its checkpoint registered by the hook
        shutil.copytree(tiny["policy"], tmp_path / f"ckpt{j}")
        launch_until_ray([*argv, "--backbone_index", str(j), "--ckpt.output_dir", str(tmp_path / f"ckpt{j}")])
        hook.register_checkpoint(soup_dir, j, tmp_path / f"ckpt{j}")
    trained = soup.read_soup(soup_dir)["backbones"][0]

    # backbone 0 again, into another folder, stopped during start-up (after soup.json records the launch)
    again = [*argv, "--backbone_index", "0", "--ckpt.output_dir", str(tmp_path / "again")]
    launch_until_ray(again)
    entry = soup.read_soup(soup_dir)["backbones"][0]
    assert entry["status"] == "trained" and entry["checkpoint"] == str(tmp_path / "ckpt0")
    assert {k: entry[k] for k in trained if k != "updated"} == {k: v for k, v in trained.items() if k != "updated"}
    assert entry["pending_launch"]["launch_args"] == again
    assert entry["pending_launch"]["output_dir"] == str(tmp_path / "again")
    assert soup.require_trained(soup_dir)[1] == [str(tmp_path / "ckpt0"), str(tmp_path / "ckpt1")]
    capsys.readouterr()
    assert cli(["soup", "show", "--soup_dir", str(soup_dir)]) == 0  # what a user reads says both
    shown = capsys.readouterr().out
    assert f"backbone 0: trained, {tmp_path / 'ckpt0'}\n    relaunched to {tmp_path / 'again'}: " in shown
    out = tmp_path / "merged"
    assert cli(["merge", "--soup_dir", str(soup_dir), "--preference", "0.5,0.5", "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file()

    # the relaunch finishes: its checkpoint replaces the old one, and its launch becomes the entry's
    shutil.copytree(tiny["policy"], tmp_path / "again")
    hook.register_checkpoint(soup_dir, 0, tmp_path / "again")
    entry = soup.read_soup(soup_dir)["backbones"][0]
    assert entry["status"] == "trained" and entry["checkpoint"] == str(tmp_path / "again")
    assert entry["launch_args"] == again and entry["output_dir"] == str(tmp_path / "again")
    assert "pending_launch" not in entry

    # registering another checkpoint (the old one, recovered by hand) leaves a pending launch pending
    third = [*argv, "--backbone_index", "0", "--ckpt.output_dir", str(tmp_path / "third")]
    launch_until_ray(third)
    hook.register_checkpoint(soup_dir, 0, tmp_path / "ckpt0")
    entry = soup.read_soup(soup_dir)["backbones"][0]
    assert entry["checkpoint"] == str(tmp_path / "ckpt0") and entry["launch_args"] == again
    assert entry["pending_launch"]["output_dir"] == str(tmp_path / "third")

    # a relaunch into the trained checkpoint's own folder overwrites it: no merge until its new checkpoint
    launch_until_ray([*argv, "--backbone_index", "1", "--ckpt.output_dir", str(tmp_path / "ckpt1")])
    entry = soup.read_soup(soup_dir)["backbones"][1]
    assert entry["status"] == "launched" and "pending_launch" not in entry
    with pytest.raises(BoneSoupError, match="trained"):
        soup.require_trained(soup_dir)
