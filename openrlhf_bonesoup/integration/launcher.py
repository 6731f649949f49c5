"""The drop-in launcher: OpenRLHF's unmodified `train_ppo_ray` main, trained on a composite reward.

`python -m openrlhf_bonesoup.cli.train_ppo_ray <OpenRLHF args> --reward_combiner bonesoup --beta 0.7
--backbone_index 0 --soup_dir soup/` parses and removes our flags, then runs `openrlhf.cli.train_ppo_ray`
as `__main__` (runpy) on the rest, so OpenRLHF's own parser, checks, Ray placement, vLLM rollouts and
trainer run as they are. In two steps:

- `resolve` / `plan`: OpenRLHF's parser on the rest, stopped right after it; from its args and our flags,
  what the launch will do, nothing done yet: the objectives and combiner, refusals of upstream options that
  would bypass the composite reward, the route (any model: every objective scored by our RewardModelActor
  group on the reward GPUs; none: our reward_func file as --reward.remote_url), the settings for upstream's
  args (args.bonesoup travels to every actor with strategy.args), what --cpu changes, the Ray runtime_env,
  the soup entry. `--dry_run` prints the plan.
- `apply`: upstream's main again, through three seams in this process. `openrlhf.utils.config.hierarchize`
  (called right after parsing) puts the plan's settings on its args; the `ray.init` that starts train(),
  after every check of upstream's main, is ours: the backbone's soup.json entry, then Ray with upstream's
  env_vars plus our worker setup hook and config; `openrlhf.trainer.ray.launcher.RewardModelActor`
  (bound by train_ppo_ray at import) is ours. After train() returns (the model is saved), the backbone goes
  to the post-training hook.

With `--cpu` the same launch runs on a machine without a GPU (integration/cpu.py): its own local Ray
with declared GPUs, DeepSpeed's CPU accelerator, vLLM's CPU build, weight sync on gloo. The upstream
patch (patches/) reaches `main` from OpenRLHF's own train_ppo_ray through `add_arguments` / `requested`.

About 450 lines, one module: a launch reads top to bottom, flags, plan, apply, then the seams they use.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import json
import logging
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from openrlhf_bonesoup import coefficients, combiners, objectives, soup
from openrlhf_bonesoup.errors import BoneSoupError, Parser
from openrlhf_bonesoup.integration import cpu, imports, worker

UPSTREAM = "openrlhf.cli.train_ppo_ray"
PROG = "python -m openrlhf_bonesoup.cli.train_ppo_ray"
REWARD_FUNC_FILE = str(Path(__file__).with_name("reward_func.py"))
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` for the driver
GPU_MODULES = ("vllm", "flash_attn_2_cuda")  # OpenRLHF imports them; only GPU machines have them
_running_openrlhf = False  # True while _run_openrlhf runs OpenRLHF's main (see add_arguments)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an OpenRLHF flag must never be taken for a prefix of one of ours.
    parser = Parser(prog=PROG, add_help=False, allow_abbrev=False, description=__doc__.split("\n")[0])
    _add_flags(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Our flags on OpenRLHF's own parser (the patched train_ppo_ray). They stay out of its args unless
    given, so a run without them is upstream's. Nothing is added while `main` runs that script on the
    argv it stripped of our flags: a leftover (an abbreviation) is then OpenRLHF's unrecognized flag."""
    if _running_openrlhf:
        return
    # argparse gives a flag added without a default the container's argument_default.
    upstream_default, parser.argument_default = parser.argument_default, argparse.SUPPRESS
    try:
        _add_flags(parser)
    finally:
        parser.argument_default = upstream_default


def requested(args: argparse.Namespace) -> bool:
    """Whether OpenRLHF's parsed args (the patched parser) hold any of our flags: then `main` takes over."""
    ours = vars(build_parser().parse_args([]))  # every dest of ours
    return any(hasattr(args, dest) for dest in ours)  # add_arguments: present only when given


def _add_flags(parser: argparse.ArgumentParser) -> None:
    combiners.add_reward_arguments(parser)
    group = parser.add_argument_group("Bone Soup soup and merge")
    group.add_argument("--soup_dir", "--soup.dir", dest="soup_dir", help="soup folder: writes/updates soup.json")
    group.add_argument(
        "--merge_preferences", "--merge.preferences", dest="merge_preferences", help='after training: "0,1;0.5,0.5"'
    )
    group.add_argument("--merge_grid", "--merge.grid", dest="merge_grid", type=int, help="after training: K-point grid")
    group.add_argument("--merge_output", "--merge.output", dest="merge_output", help="default: <soup_dir>/merged")
    group.add_argument(
        "--dry_run", "--launcher.dry_run", dest="dry_run", action="store_true", help="print what would run and exit"
    )
    group.add_argument(
        "--cpu",
        "--launcher.cpu",
        dest="cpu",
        action="store_true",
        help="rehearse on this machine without a GPU (tiny models): own local Ray, DeepSpeed on CPU, vLLM's CPU build",
    )


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, rest = build_parser().parse_known_args(argv)
    _check_merge_flags(ours)
    return ours, rest


def _check_merge_flags(ours: argparse.Namespace) -> None:
    wants_merge = ours.merge_preferences is not None or ours.merge_grid is not None
    if ours.merge_preferences is not None and ours.merge_grid is not None:
        raise BoneSoupError("give --merge_preferences or --merge_grid, not both")
    if ours.merge_output is not None and not wants_merge:
        raise BoneSoupError("--merge_output needs --merge_preferences or --merge_grid")
    if wants_merge and not ours.soup_dir:
        raise BoneSoupError("merging after training needs --soup_dir (the merge waits for all n backbones)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        quiet_deepspeed()
        print(build_parser().format_help())
        print("OpenRLHF options (openrlhf.cli.train_ppo_ray):\n")
        with contextlib.suppress(SystemExit), imports.without_gpu_stack():
            _run_openrlhf(["--help"])
        return 0
    try:
        ours, _ = _parse(argv)
        if ours.cpu:
            cpu.enable()
        if ours.dry_run:
            quiet_deepspeed()
            # Only the plan on stdout (`--dry_run | jq`): OpenRLHF's imports log there (DeepSpeed).
            with imports.without_gpu_stack(), contextlib.redirect_stdout(sys.stderr):
                launch, _ = resolve(argv)
            print(json.dumps(coefficients.clean(launch), indent=2))
            return 0
        missing = [name for name in GPU_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            raise BoneSoupError(
                f"{' and '.join(missing)} not installed: a training launch needs OpenRLHF's GPU stack "
                '(pip install "openrlhf[vllm]==0.11.2"); --help and --dry_run work without it'
            )
        launch, _ = resolve(argv)
        apply(launch)
    except BoneSoupError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


def resolve(argv: Sequence[str]) -> tuple[dict, Any]:
    """What a launch would do, nothing done: OpenRLHF's real parser on the argv left after our flags,
    stopped right after it, then `plan`. Returns (the plan, OpenRLHF's args with the plan's settings)."""
    ours, rest = _parse(argv)

    class Parsed(Exception):
        pass

    def stop(args):
        raise Parsed(args)

    try:
        with _hierarchize_then(stop):
            _run_openrlhf(rest)
    except Parsed as parsed:
        args = parsed.args[0]
        launch = plan(ours, args, argv, rest)
        _set(args, launch)
        return launch, args
    raise RuntimeError(f"{UPSTREAM} returned without calling hierarchize: is this OpenRLHF 0.11?")


def plan(ours: argparse.Namespace, args, argv: Sequence[str], openrlhf_argv: list[str]) -> dict:
    """What a launch will do, from our flags and OpenRLHF's parsed args (only read): every refusal of ours
    now, before anything runs. `--dry_run` prints it; `apply` does it."""
    cpu_changes = cpu.launch_settings(args) if ours.cpu else {}
    notices = [f"[bonesoup] --cpu: --{o} {now} (was {was}): {why}" for o, (was, now, why) in cpu_changes.items()]
    # `--cpu` alone is this plan: OpenRLHF's own launch rehearsed on CPU, its reward settings untouched (no
    # objectives, no soup); e.g. the baseline of benchmarks/ppo_step.py. A Bone Soup launch overrides below.
    launch = {
        "openrlhf_argv": openrlhf_argv,
        "bonesoup": None,
        "reward.model_name_or_path": args.reward.model_name_or_path,
        "reward.remote_url": args.reward.remote_url,
        "critic.model_name_or_path": args.critic.model_name_or_path,
        "backbone_index": None,
        # Absolute, so that the policy actor (another process, maybe another node) saves where the
        # manifest and the post-training hook look.
        "output_dir": str(Path(args.ckpt.output_dir).resolve()),
        "soup_dir": None,
        "soup": None,
        "merge_preferences": None,
        "merge_output": None,
        "runtime_env": runtime_env(None, cpu_launch=ours.cpu),
        "ray": cpu.local_ray(args, cpu_changes) if ours.cpu else {},
        "cpu": cpu_changes if ours.cpu else None,
        "notices": notices,  # printed when the launch starts Ray
    }
    if ours.reward_combiner is None and ours.cpu and not (ours.objectives or ours.soup_dir):
        return launch
    # Upstream's own ways of naming rewards are the objectives, in this order: the reward models of
    # --reward.model_name_or_path, then the reward_func files and endpoints of --reward.remote_url (the
    # recipes pass reward functions there). --objectives FILE names them with their settings instead.
    upstream = [x for x in (args.reward.model_name_or_path, args.reward.remote_url) if x]
    if ours.objectives and upstream:
        raise BoneSoupError(
            "give the objectives once: --objectives FILE, or upstream's --reward.model_name_or_path A,B and "
            "--reward.remote_url C.py,http://..."
        )
    specs = objectives.parse_objectives(ours.objectives or ",".join(upstream))
    weights = combiners.weights_from_args(ours, len(specs))
    route = worker.ROUTE_ACTORS if objectives.needs_reward_actors(specs) else worker.ROUTE_REWARD_FUNC
    _refuse_bypasses(args, specs, route)
    # Pre-flight from config.json and safetensors headers, no weights loaded: a wrong checkpoint is refused
    # now, not when it loads after Ray, DeepSpeed and vLLM have started.
    objectives.check_models(specs, ring_attention=args.ds.ring_attn_size > 1)
    sft = soup.checkpoint_path(args.actor.model_name_or_path, "--actor.model_name_or_path", hub_ok=True)
    # Checked now, not after hours of training.
    preferences = None
    if ours.merge_grid is not None or ours.merge_preferences is not None:
        preferences = coefficients.preference_sweep(len(specs), ours.merge_grid, ours.merge_preferences)

    # The route. Reward actors: upstream builds and initialises the reward group when model_name_or_path is
    # set and remote_url is not; our actor reads the objectives from args.bonesoup, the value only names
    # them in logs. Otherwise our reward_func file scores every objective in the rollout workers.
    actors = route == worker.ROUTE_ACTORS
    reward_models = ",".join(s.get("path") or s["url"] for s in specs) if actors else args.reward.model_name_or_path
    # Upstream starts a GAE critic from the first reward model when none is given. With n objectives
    # that choice is arbitrary and often wrong (an HF classifier on another tokenizer), so the critic
    # starts from the policy instead, as upstream does for remote rewards; an explicit flag wins.
    critic = args.critic.model_name_or_path
    if args.algo.advantage.estimator == "gae" and critic is None:
        critic = args.actor.model_name_or_path
        notices.insert(0, f"[bonesoup] no --critic.model_name_or_path: the critic starts from {critic}")
    config = {"objectives": specs, "weights": weights.tolist(), "combiner": ours.reward_combiner, "route": route}
    registered = None
    if ours.soup_dir:  # a soup needs B: Bone Soup's B(beta), or Rewarded Soup's B = I (beta = 1) for `single`
        if ours.reward_combiner == "linear":
            raise BoneSoupError("--soup_dir needs --reward_combiner bonesoup or single (linear weights define no soup)")
        beta = ours.beta if ours.reward_combiner == "bonesoup" else 1.0
        registered = {"beta": beta, "sft": sft, "launch_args": [a for a in argv if a != "--dry_run"]}
    return {
        **launch,
        "bonesoup": config,  # on args.bonesoup: it travels to every actor with strategy.args
        "reward.model_name_or_path": reward_models,
        "reward.remote_url": None if actors else REWARD_FUNC_FILE,
        "critic.model_name_or_path": critic,
        "backbone_index": ours.backbone_index if ours.reward_combiner == "bonesoup" else ours.objective,
        "soup_dir": ours.soup_dir,
        "soup": registered,  # soup.json: B from beta, the SFT model, this backbone's launch
        "merge_preferences": preferences,
        "merge_output": ours.merge_output,
        "runtime_env": runtime_env(config, cpu_launch=ours.cpu),
    }


def _set(args, launch: dict) -> None:
    """The plan's settings on OpenRLHF's parsed args, before upstream's own checks read them."""
    args.bonesoup = launch["bonesoup"]
    args.reward.model_name_or_path = launch["reward.model_name_or_path"]
    args.reward.remote_url = launch["reward.remote_url"]
    args.critic.model_name_or_path = launch["critic.model_name_or_path"]
    args.ckpt.output_dir = launch["output_dir"]
    for option, (_, now, _) in (launch["cpu"] or {}).items():
        group, name = option.split(".")
        setattr(getattr(args, group), name, now)


def _refuse_bypasses(args, specs: list[dict], route: str) -> None:
    """Upstream options that would replace, skip or silently miscompute the composite reward: refused
    here, before Ray starts, instead of discovered after training."""
    if args.train.agent_func_path and route == worker.ROUTE_ACTORS:
        raise BoneSoupError(
            "--train.agent_func_path: OpenRLHF builds no reward model group for agents, and these objectives "
            "include models; score agent episodes with reward_func files and endpoints"
        )
    # Upstream's filter (samples_generator.py, _generate_vllm) reads each rollout's `scores`, set in the rollout
    # worker. On the reward_func route our file sets them to h_j, combined as the trainer combines (fixed
    # normalisation only); model objectives are scored later, in the trainer, so nothing there is h_j.
    if args.algo.dynamic_filtering_enable and route == worker.ROUTE_ACTORS:
        raise BoneSoupError(
            "--algo.dynamic_filtering_enable filters on scores set in the rollout workers, and these objectives "
            "include models scored later by the reward actors: filter with reward_func files and endpoints only"
        )
    if args.eval.dataset and route == worker.ROUTE_ACTORS:
        raise BoneSoupError(
            "--eval.dataset: OpenRLHF evaluates with rollout-side rewards only, and these objectives include models "
            "scored by the reward actors; evaluate soups with `openrlhf-bonesoup evaluate` instead"
        )
    # The plugin's LoRA weight sync (integration/lora_sync.py) sends vLLM W + s B A built from the base weight:
    # a DeepSpeed tensor-parallel shard is gathered by another path, and a 4-bit base is packed bytes, not W.
    if args.ds.lora.rank > 0 and args.ds.tensor_parallel_size > 1:
        raise BoneSoupError(
            "--ds.lora.rank with --ds.tensor_parallel_size > 1: the LoRA weight sync to vLLM does not gather "
            "tensor-parallel shards; use ZeRO (--ds.zero_stage 3) to shard a LoRA policy"
        )
    if args.ds.lora.rank > 0 and args.ds.load_in_4bit:
        raise BoneSoupError(
            "--ds.lora.rank with --ds.load_in_4bit (QLoRA): the weight sync to vLLM would send the 4-bit base's "
            "packed bytes as weights; train the adapter on a 16-bit base"
        )
    running = [s["name"] for s in specs if s["normalize"] == "running"]
    if args.algo.dynamic_filtering_enable and running:
        raise BoneSoupError(
            f"--algo.dynamic_filtering_enable with `normalize: running` ({', '.join(running)}): the filter runs in "
            "the rollout workers, which never see the trainer's running statistics; use fixed {mean, std}"
        )
    if args.eval.dataset and running:
        raise BoneSoupError(
            f"--eval.dataset with `normalize: running` ({', '.join(running)}): evaluation rewards are computed in "
            "the rollout workers, which never see the trainer's running statistics; use fixed {mean, std}"
        )


def runtime_env(config: dict | None, cpu_launch: bool = False) -> dict:
    """Upstream train()'s runtime_env plus our setup hook and config, fit to a `ray job submit` job.

    Under `ray job submit --runtime-env-json`, Ray merges the job's runtime_env with ray.init's and
    refuses any key set by both (ray._private.worker, RAY_OVERRIDE_JOB_RUNTIME_ENV). So we leave out
    the env vars the job sets (their values are this process's environment anyway) and our hook when
    the job already names it; another hook cannot be combined with ours.
    """
    env_vars = {
        # As upstream train(): respect user-set values, else its defaults.
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
    }
    if config is not None:  # None: `--cpu` alone, no combiner (plan)
        env_vars[worker.CONFIG_ENV] = json.dumps(config)
    if cpu_launch:
        env_vars.update(cpu.worker_env_vars())
    env = {"env_vars": env_vars, "worker_process_setup_hook": worker.SETUP_HOOK}
    if JOB_CONFIG_ENV not in os.environ:
        return env
    job_env = json.loads(os.environ[JOB_CONFIG_ENV]).get("runtime_env") or {}
    job_vars = job_env.get("env_vars") or {}
    if worker.CONFIG_ENV in job_vars:
        raise BoneSoupError(f"the job's runtime_env sets {worker.CONFIG_ENV}: leave it to the launcher")
    for key in job_vars:
        env_vars.pop(key, None)
    hook = job_env.get("worker_process_setup_hook")
    if hook == worker.SETUP_HOOK:
        del env["worker_process_setup_hook"]
    elif hook:
        raise BoneSoupError(f"the job's runtime_env has worker_process_setup_hook {hook!r}; Bone Soup needs its own")
    return env


def apply(launch: dict) -> None:
    """Run the launch `plan` describes: OpenRLHF's train_ppo_ray on its argv, the plan's settings on the args
    it parses, then the post-training hook. Nothing outside this process changes until upstream's own
    checks after parsing have passed: its train() then starts Ray (`_before_training` does instead)."""
    import ray

    if ray.is_initialized():  # train() would skip ray.init, so our runtime_env, hook and soup entry
        raise BoneSoupError("Ray is already initialised in this process: the launcher must start it with its hook")
    upstream_init = ray.init

    def init(*args, **kwargs):  # train_ppo_ray.py:21-24, train()'s first lines: every check is behind us
        ray.init = upstream_init  # once: _start_ray calls the real one
        _before_training(launch)

    actor = _actor_replaced() if launch["bonesoup"] else contextlib.nullcontext()
    with _hierarchize_then(lambda args: _set(args, launch)), _replaced(ray, "init", init), actor:
        _run_openrlhf(launch["openrlhf_argv"])
    if launch["soup_dir"]:
        from openrlhf_bonesoup import hook  # the post-training hook; imported only when a launch ends

        merged = hook.after_training(
            launch["soup_dir"],
            launch["backbone_index"],
            launch["output_dir"],
            merge_preferences=launch["merge_preferences"],
            merge_output=launch["merge_output"],
        )
        for path in merged:
            print(f"merged: {path}")


def _before_training(launch: dict) -> None:
    """In place of upstream train()'s ray.init: the backbone's soup entry, what the launch changed, then Ray
    with our runtime_env (upstream's env_vars, our worker hook and config)."""
    if launch["soup"]:
        _register(launch)
    for line in launch["notices"]:
        print(line)
    _start_ray(launch["runtime_env"], launch["ray"])


def _register(launch: dict) -> None:
    registered, specs = launch["soup"], launch["bonesoup"]["objectives"]
    soup.init_soup(
        launch["soup_dir"],
        objectives=specs,
        beta=registered["beta"],
        matrix=coefficients.backbone_matrix(registered["beta"], len(specs)),
        sft=registered["sft"],
    )
    # A backbone already trained keeps its status and checkpoint: this launch is recorded beside them
    # (soup.register_backbone) until the post-training hook registers its checkpoint.
    soup.register_backbone(
        launch["soup_dir"],
        launch["backbone_index"],
        status="launched",
        launch_args=registered["launch_args"],
        output_dir=launch["output_dir"],
    )


def _start_ray(env: dict, local: dict) -> None:
    # `local`: --cpu's own local cluster (cpu.local_ray); else Ray's default: the cluster of this node or job.
    import ray

    ray.init(runtime_env=env, **local)


def _run_openrlhf(argv: list[str]) -> None:
    global _running_openrlhf
    sys.argv = [UPSTREAM, *argv]
    _running_openrlhf = True
    try:
        with _one_line_parser_errors():
            runpy.run_module(UPSTREAM, run_name="__main__", alter_sys=True)
    finally:
        _running_openrlhf = False


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name = value` while the block runs: each seam into upstream's code, restored after."""
    upstream = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, upstream)


def _hierarchize_then(step) -> contextlib.AbstractContextManager:
    # Upstream's main imports hierarchize at call time, right after parsing (train_ppo_ray.py:628-630):
    # `step(args)` sees (and may change) its parsed args before any of its checks.
    import openrlhf.utils.config as config

    upstream = config.hierarchize

    def hierarchize(args):
        args = upstream(args)
        step(args)
        return args

    return _replaced(config, "hierarchize", hierarchize)


def _actor_replaced() -> contextlib.AbstractContextManager:
    # train_ppo_ray binds the name when it is imported, which runpy does inside the block.
    import openrlhf.trainer.ray.launcher as launcher

    from openrlhf_bonesoup.integration.actor import RewardModelActor

    return _replaced(launcher, "RewardModelActor", RewardModelActor)


@contextlib.contextmanager
def _one_line_parser_errors() -> Iterator[None]:
    """OpenRLHF's parser answers a mistyped flag with its whole usage (150 lines): one line instead, with
    the closest flags of OpenRLHF's parser and ours (difflib over their option strings)."""

    def error(parser: argparse.ArgumentParser, message: str):
        # argparse keeps every option string in _option_string_actions; it has no public list of them.
        known = [*parser._option_string_actions, *build_parser()._option_string_actions]
        flags = [w.split("=")[0] for w in message.split() if w.startswith("--")]
        if message.startswith("unrecognized arguments:") and flags:
            hints = []
            for flag in flags:
                close = difflib.get_close_matches(flag, known, n=3)
                hints.append(f"{flag} (did you mean {' or '.join(close)}?)" if close else f"{flag} (no flag is close)")
            message = f"unrecognized arguments: {', '.join(hints)}; see --help"
        raise BoneSoupError(message)

    with _replaced(argparse.ArgumentParser, "error", error):
        yield


def _hide_cpu_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def quiet_deepspeed() -> None:
    """Hide DeepSpeed's "[WARNING] Setting accelerator to CPU", logged when OpenRLHF imports it on a machine
    without a GPU: noise where nothing trains (--help, --dry_run, the CLI's commands). A launch keeps it."""
    logging.getLogger("DeepSpeed").addFilter(_hide_cpu_notice)  # the logger DeepSpeed creates on import
