"""The drop-in launcher: OpenRLHF's unmodified `train_ppo_ray` main, trained on a composite reward.

`python -m openrlhf_bonesoup.cli.train_ppo_ray <OpenRLHF args> --reward_combiner bonesoup --beta 0.7
--backbone_index 0 --soup_dir soup/` parses and removes our flags, then runs
`openrlhf.cli.train_ppo_ray` as `__main__` (runpy) on the rest, so OpenRLHF's own parser, checks,
Ray placement, vLLM rollouts and trainer run as they are. Two seams, both in this process:

- `openrlhf.utils.config.hierarchize`: upstream's main imports it at call time, right after parsing.
  Our wrapper sees OpenRLHF's parsed args first: it refuses upstream options that would bypass the
  composite reward, resolves the objectives and the combiner, routes the reward (any model: every
  objective scored by our RewardModelActor group on the reward GPUs; none: our reward_func file as
  --reward.remote_url), puts the config on args.bonesoup (it travels to every actor with
  strategy.args), writes the soup manifest, and starts Ray with upstream's env_vars plus our worker
  setup hook and config (train() then skips its own ray.init).
- `openrlhf.trainer.ray.launcher.RewardModelActor`: train_ppo_ray imports this name at import time,
  so it is swapped for ours before runpy and restored after.

With `--cpu` the same launch runs on a machine without a GPU (integration/cpu.py): its own local Ray
with declared GPUs, DeepSpeed's CPU accelerator, vLLM's CPU build, weight sync on gloo.

After train() returns (the model is saved), the backbone goes to the post-training hook. The upstream
patch (patches/) reaches `main` from OpenRLHF's own train_ppo_ray through `add_arguments` / `requested`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.abc
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
from openrlhf_bonesoup.coefficients import BoneSoupError, Parser
from openrlhf_bonesoup.integration import cpu, worker

UPSTREAM = "openrlhf.cli.train_ppo_ray"
PROG = "python -m openrlhf_bonesoup.cli.train_ppo_ray"
REWARD_FUNC_FILE = str(Path(__file__).with_name("reward_func.py"))
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` for the driver
GPU_MODULES = ("vllm", "flash_attn_2_cuda")  # OpenRLHF imports them; only GPU machines have them
_running_openrlhf = False  # True while _run_openrlhf runs OpenRLHF's main (see add_arguments)


class DryRun(Exception):
    """Raised from our step inside OpenRLHF's main to stop before anything runs: (plan, args)."""


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        quiet_deepspeed()
        print(build_parser().format_help())
        print("OpenRLHF options (openrlhf.cli.train_ppo_ray):\n")
        with contextlib.suppress(SystemExit), _gpu_modules_for_parsing():
            _run_openrlhf(["--help"])
        return 0
    try:
        ours, rest = _parse(argv)
        if ours.cpu:  # before OpenRLHF imports deepspeed (it picks its accelerator at import) or any CUDA site
            os.environ[cpu.ENV] = "1"
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            cpu.apply()
        if ours.dry_run:
            quiet_deepspeed()
            # Only the plan on stdout (`--dry_run | jq`): OpenRLHF's imports log there (DeepSpeed).
            with _gpu_modules_for_parsing(), contextlib.redirect_stdout(sys.stderr):
                plan, _ = resolve(argv)
            print(json.dumps(coefficients.clean(plan), indent=2))
            return 0
        missing = [name for name in GPU_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            raise BoneSoupError(
                f"{' and '.join(missing)} not installed: a training launch needs OpenRLHF's GPU stack "
                '(pip install "openrlhf[vllm]==0.11.2"); --help and --dry_run work without it'
            )
        launch: dict = {"openrlhf_argv": rest}
        with _hierarchize_then(lambda args: prepare(ours, args, argv, launch)), _actor_replaced():
            _run_openrlhf(rest)
        if ours.soup_dir:
            from openrlhf_bonesoup import hook  # the post-training hook; imported only when a launch ends

            merged = hook.after_training(
                ours.soup_dir,
                launch["backbone_index"],
                launch["output_dir"],
                merge_preferences=launch["merge_preferences"],
                merge_output=ours.merge_output,
            )
            for path in merged:
                print(f"merged: {path}")
    except BoneSoupError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


def resolve(argv: Sequence[str]) -> tuple[dict, Any]:
    """What a launch would run, without running anything: OpenRLHF's real parser on the argv left
    after our flags, then our step (no manifest, no Ray). Returns (plan, OpenRLHF's args)."""
    ours, rest = _parse(argv)
    ours.dry_run = True
    try:
        with _hierarchize_then(lambda args: prepare(ours, args, argv, {"openrlhf_argv": rest})):
            _run_openrlhf(rest)
    except DryRun as stop:
        return stop.args
    raise RuntimeError(f"{UPSTREAM} returned without calling hierarchize: is this OpenRLHF 0.11?")


class _ParseOnly(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty `vllm` / `flash_attn_2_cuda` modules, found only when no real one is (this finder comes last
    on sys.meta_path): enough for OpenRLHF's train_ppo_ray to import and parse its flags on a machine
    without its GPU stack. Any name taken from them raises at use, never silently."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in GPU_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname == "vllm")

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        def missing(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def refuse(*args, **kwargs):
                raise BoneSoupError(f"{module.__name__}.{attr}: {module.__name__} is not installed here")

            return type(attr, (), {"__init__": refuse, "__call__": refuse})

        module.__getattr__ = missing


@contextlib.contextmanager
def _gpu_modules_for_parsing() -> Iterator[None]:
    finder = _ParseOnly()
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if getattr(m, "__loader__", None) is finder]:
            del sys.modules[name]


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, rest = build_parser().parse_known_args(argv)
    _check_merge_flags(ours)
    return ours, rest


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
def _one_line_parser_errors() -> Iterator[None]:
    """OpenRLHF's parser answers a mistyped flag with its whole usage (150 lines): one line instead, with
    the closest flags of OpenRLHF's parser and ours (difflib over their option strings)."""
    upstream = argparse.ArgumentParser.error

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

    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = upstream


def _hide_cpu_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def quiet_deepspeed() -> None:
    """Hide DeepSpeed's "[WARNING] Setting accelerator to CPU", logged when OpenRLHF imports it on a machine
    without a GPU: noise where nothing trains (--help, --dry_run, the CLI's commands). A launch keeps it."""
    logging.getLogger("DeepSpeed").addFilter(_hide_cpu_notice)  # the logger DeepSpeed creates on import


@contextlib.contextmanager
def _hierarchize_then(step) -> Iterator[None]:
    import openrlhf.utils.config as config

    upstream = config.hierarchize
    config.hierarchize = lambda args: step(upstream(args))
    try:
        yield
    finally:
        config.hierarchize = upstream


@contextlib.contextmanager
def _actor_replaced() -> Iterator[None]:
    import openrlhf.trainer.ray.launcher as launcher

    from openrlhf_bonesoup.integration.actor import RewardModelActor

    upstream = launcher.RewardModelActor
    launcher.RewardModelActor = RewardModelActor
    try:
        yield
    finally:
        launcher.RewardModelActor = upstream


def _check_merge_flags(ours: argparse.Namespace) -> None:
    wants_merge = ours.merge_preferences is not None or ours.merge_grid is not None
    if ours.merge_preferences is not None and ours.merge_grid is not None:
        raise BoneSoupError("give --merge_preferences or --merge_grid, not both")
    if ours.merge_output is not None and not wants_merge:
        raise BoneSoupError("--merge_output needs --merge_preferences or --merge_grid")
    if wants_merge and not ours.soup_dir:
        raise BoneSoupError("merging after training needs --soup_dir (the merge waits for all n backbones)")


def prepare(ours: argparse.Namespace, args, argv: Sequence[str], launch: dict):
    """Our step between OpenRLHF's parsing and its checks: refuse, resolve, route, record, start Ray."""
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
    args.reward.remote_url = None  # its files and endpoints are objectives now: the route below calls them
    weights = combiners.weights_from_args(ours, len(specs))
    route = worker.ROUTE_ACTORS if objectives.needs_reward_actors(specs) else worker.ROUTE_REWARD_FUNC
    _refuse_bypasses(args, specs, route)
    # Pre-flight from config.json and safetensors headers, no weights loaded: a wrong checkpoint is refused
    # now, not when it loads after Ray, DeepSpeed and vLLM have started.
    objectives.check_models(specs, ring_attention=args.ds.ring_attn_size > 1)
    soup.checkpoint_path(args.actor.model_name_or_path, "--actor.model_name_or_path", hub_ok=True)
    # Checked now, not after hours of training.
    preferences = None
    if ours.merge_grid is not None or ours.merge_preferences is not None:
        preferences = coefficients.preference_sweep(len(specs), ours.merge_grid, ours.merge_preferences)

    if route == worker.ROUTE_ACTORS:
        # Upstream builds and initialises the reward group when this is set and remote_url is not;
        # our actor reads the objectives from args.bonesoup, the value only names them in logs.
        args.reward.model_name_or_path = ",".join(s.get("path") or s["url"] for s in specs)
    else:
        args.reward.remote_url = REWARD_FUNC_FILE
    # Upstream starts a GAE critic from the first reward model when none is given. With n objectives
    # that choice is arbitrary and often wrong (an HF classifier on another tokenizer), so the critic
    # starts from the policy instead, as upstream does for remote rewards; an explicit flag wins.
    critic_defaulted = args.algo.advantage.estimator == "gae" and args.critic.model_name_or_path is None
    if critic_defaulted:
        args.critic.model_name_or_path = args.actor.model_name_or_path
    args.bonesoup = {
        "objectives": specs,
        "weights": weights.tolist(),
        "combiner": ours.reward_combiner,
        "route": route,
    }
    backbone_index = ours.backbone_index if ours.reward_combiner == "bonesoup" else ours.objective
    # Absolute, so that the policy actor (another process, maybe another node) saves where the
    # manifest and the post-training hook look.
    output_dir = args.ckpt.output_dir = str(Path(args.ckpt.output_dir).resolve())
    launch.update(backbone_index=backbone_index, output_dir=output_dir, merge_preferences=preferences)
    cpu_changes = _cpu_settings(args) if ours.cpu else None
    env = runtime_env(args.bonesoup, cpu_launch=ours.cpu)
    if ours.dry_run:
        raise DryRun(
            {
                "openrlhf_argv": launch["openrlhf_argv"],
                "bonesoup": args.bonesoup,
                "reward.model_name_or_path": args.reward.model_name_or_path,
                "reward.remote_url": args.reward.remote_url,
                "critic.model_name_or_path": args.critic.model_name_or_path,
                "backbone_index": backbone_index,
                "output_dir": output_dir,
                "soup_dir": ours.soup_dir,
                "merge_preferences": preferences,
                "runtime_env": env,
                "cpu": cpu_changes,
            },
            args,
        )
    if ours.soup_dir:
        _register(ours, specs, args, argv, backbone_index, output_dir)
    if critic_defaulted:
        print(f"[bonesoup] no --critic.model_name_or_path: the critic starts from {args.actor.model_name_or_path}")
    for option, (was, now, why) in (cpu_changes or {}).items():
        print(f"[bonesoup] --cpu: --{option} {now} (was {was}): {why}")
    _start_ray(env, _cpu_gpus(args) if ours.cpu else None)
    return args


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
    # The plugin's LoRA weight sync (worker._patch_lora_sync) sends vLLM W + s B A built from the base weight:
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


def _register(ours, specs: list[dict], args, argv: Sequence[str], backbone_index: int, output_dir: str) -> None:
    # A soup needs B: Bone Soup's B(beta), or Rewarded Soup's B = I (beta = 1) for `single`.
    if ours.reward_combiner == "linear":
        raise BoneSoupError("--soup_dir needs --reward_combiner bonesoup or single (linear weights define no soup)")
    beta = ours.beta if ours.reward_combiner == "bonesoup" else 1.0
    soup.init_soup(
        ours.soup_dir,
        objectives=specs,
        beta=beta,
        matrix=coefficients.backbone_matrix(beta, len(specs)),
        sft=soup.checkpoint_path(args.actor.model_name_or_path, "--actor.model_name_or_path", hub_ok=True),
    )
    soup.register_backbone(
        ours.soup_dir, backbone_index, status="launched", launch_args=list(argv), output_dir=output_dir
    )


# --cpu turns these off, one printed line each (and --dry_run lists them): each needs a CUDA kernel,
# allocator or library, and each only changes a GPU launch's speed or memory, not what it computes
# (padded rows give what packed rows give; whole batches what token-budget micro-batches give).
CPU_OFF = {
    "ds.packing_samples": (False, "packing needs flash-attn's variable-length CUDA kernels; rows are padded"),
    "train.dynamic_batch_enable": (False, "token-budget micro-batches turn on packing (flash-attn's CUDA kernels)"),
    "vllm.enable_sleep": (False, "sleep modes free and restore CUDA memory pools"),
    "ds.enable_sleep": (False, "sleep modes free and restore CUDA memory pools"),
    "vllm.sync_with_ray": (False, "Ray collectives need NCCL; --cpu syncs weights on vLLM's gloo group"),
    "vllm.sync_backend": ("gloo", "NCCL needs GPUs (colocated launches then sync over it, not CUDA IPC)"),
    "ds.ring_attn_size": (1, "ring attention needs flash-attn's kernels"),
    "ds.tensor_parallel_size": (1, "DeepSpeed's tensor parallel splits layers over GPUs"),
    "vllm.tensor_parallel_size": (1, "one vLLM engine process per engine"),
}


# The refusals that stay: turning these off would rehearse another computation.
CPU_REFUSED = {
    "ds.load_in_4bit": "the policy's weights would be full precision, not NF4 as on the GPU launch (and "
    "bitsandbytes' 4-bit kernels need CUDA)",
}


def _cpu_settings(args) -> dict:
    """--cpu: set what fits a CPU machine. Returns {option: [was, now, why]}; each change is printed."""
    for option, why in CPU_REFUSED.items():
        group, name = option.split(".")
        if getattr(getattr(args, group), name):
            raise BoneSoupError(f"--{option} cannot run with --cpu: {why}")
    changes = {}

    def change(option: str, value, why: str) -> None:
        group, name = option.split(".")
        was = getattr(getattr(args, group), name)
        if was != value:
            setattr(getattr(args, group), name, value)
            changes[option] = [was, value, why]

    for option, (value, why) in CPU_OFF.items():
        change(option, value, why)
    # A rehearsal of the recipe, not of its scale: every model group and vLLM runs as one process.
    for group in ("actor", "ref", "critic", "reward"):
        change(f"{group}.num_nodes", 1, "a rehearsal of the recipe, not of its scale")
        change(f"{group}.num_gpus_per_node", 1, "a rehearsal of the recipe, not of its scale")
    # OpenRLHF 0.11 generates rollouts only through vLLM engines
    change("vllm.num_engines", 1, "a rehearsal of the recipe, not of its scale")
    if "flash" in args.ds.attn_implementation:  # upstream's default: flash_attention_2, a CUDA kernel
        change("ds.attn_implementation", "eager", "flash attention is a CUDA kernel")
    if args.vllm.gpu_memory_utilization > 0.2:
        change("vllm.gpu_memory_utilization", 0.05, "on vLLM's CPU build, the share of RAM for the KV cache")
    return changes


def _cpu_gpus(args) -> int:
    """GPUs to declare on the --cpu local Ray: one per actor and vLLM rank, so every placement fits."""
    groups = (args.actor, args.ref, args.critic, args.reward)
    vllm = args.vllm.num_engines * args.vllm.tensor_parallel_size
    return sum(g.num_nodes * g.num_gpus_per_node for g in groups) + vllm


def runtime_env(config: dict, cpu_launch: bool = False) -> dict:
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
        worker.CONFIG_ENV: json.dumps(config),
    }
    if cpu_launch:  # every Ray worker (and the vLLM processes they spawn) applies integration/cpu.py
        env_vars.update({cpu.ENV: "1", "DS_ACCELERATOR": "cpu"})
        # vLLM's CPU build moves the model into a process of its own unless this is 0 (platforms/cpu.py:
        # 333-341 forces the "mp" executor): one more process importing vLLM and torch (~8 s of a launch).
        # At 0 the rollout engine keeps its "uni" executor, the model in the engine core's process, which
        # is a GPU launch's layout at tensor parallel size 1 (trainer/ray/vllm_engine.py:240). vLLM calls
        # that unsupported on CPU (its OpenMP set-up); for a rehearsal's tiny model, test_launch's
        # vLLM-vs-actor log-prob check (train/vllm_kl < 1e-3) shows the rollouts stay right.
        env_vars[cpu.VLLM_MP_ENV] = os.environ.get(cpu.VLLM_MP_ENV, "0")
    env = {"env_vars": env_vars, "worker_process_setup_hook": worker.HOOK}
    if JOB_CONFIG_ENV not in os.environ:
        return env
    job_env = json.loads(os.environ[JOB_CONFIG_ENV]).get("runtime_env") or {}
    job_vars = job_env.get("env_vars") or {}
    if worker.CONFIG_ENV in job_vars:
        raise BoneSoupError(f"the job's runtime_env sets {worker.CONFIG_ENV}: leave it to the launcher")
    for key in job_vars:
        env_vars.pop(key, None)
    hook = job_env.get("worker_process_setup_hook")
    if hook == worker.HOOK:
        del env["worker_process_setup_hook"]
    elif hook:
        raise BoneSoupError(f"the job's runtime_env has worker_process_setup_hook {hook!r}; Bone Soup needs its own")
    return env


def _start_ray(env: dict, cpu_gpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        raise BoneSoupError("Ray is already initialised in this process: the launcher must start it with its hook")
    if cpu_gpus is None:
        ray.init(runtime_env=env)
        return
    # --cpu: a new local cluster of this process (address="local": never a cluster already running here),
    # with GPUs declared so that OpenRLHF's placement groups fit; vLLM's CPU build ignores them.
    ray.init(address="local", num_cpus=cpu_gpus + 2, num_gpus=cpu_gpus, include_dashboard=False, runtime_env=env)
