"""The one console shell of every cnfgnn command, and config composition with clear errors.

Every command (``cnfgnn``, ``cnfgnn-data``, ``cnfgnn-compare``, ``cnfgnn-report``,
``cnfgnn-forecast``, ``cnfgnn-robustness``, ``cnfgnn-bench``, ``cnfgnn-deploy``)
runs its work through :func:`console`: ``-h``/``--help`` prints the command's usage and
examples (exit 0); bad input -- a misspelt config key, an unknown option, bad data -- prints
``<command>: <problem>`` with the close key names where there are some, and exits 2.

:func:`compose` is the composition used by the commands and the Python API: a misspelt key
or group option is an error naming the close matches (Hydra alone silently ignores a
misspelt ``experiment=``, an optional group).
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cnfgnn import paths

log = logging.getLogger(__name__)

#: Exit status of a command given bad input (usage errors, as argparse uses).
EXIT_BAD_INPUT = 2
_KEY_PATTERNS = (
    r"Could not override '([^']+)'",
    r"full_key: (\S+)",
    r"Key '([^']+)'",
    r"Could not find '([^']+)'",
)


class UsageError(ValueError):
    """Bad command-line input: the message names the argument and the fix."""


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted names of every key (inner nodes included) of a nested config or dict."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            name = f"{prefix}{k}"
            out.append(name)
            out.extend(flat_keys(v, name + "."))
    return out


def known_keys(conf: Path | None = None) -> list[str]:
    """Keys a command line may set: the composed default config, every option of every
    group (``dataset.url`` of ``dataset=metr_la`` too), and the group names themselves."""
    from omegaconf import OmegaConf

    conf = conf or paths.conf_dir()
    keys = set(flat_keys(OmegaConf.load(conf / "config.yaml")))
    for group in (p for p in conf.iterdir() if p.is_dir()):
        keys.add(group.name)
        for option in group.glob("*.yaml"):
            try:
                node = OmegaConf.load(option)
            except Exception as exc:  # noqa: BLE001 - a broken option is reported when chosen
                log.debug("skipping %s for key suggestions: %s", option, exc)
                continue
            is_global = "@package _global_" in option.read_text()[:500]
            keys.update(flat_keys(node) if is_global else flat_keys(node, group.name + "."))
    keys.discard("defaults")
    return sorted(k for k in keys if not k.startswith("defaults"))


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates spelt like ``word`` (difflib ratio >= 0.6)."""
    cands = list(candidates)
    found = difflib.get_close_matches(word, cands, n=n, cutoff=0.6)
    if not found and "." in word:  # compare the last part among keys with the same prefix
        head, _, tail = word.rpartition(".")
        sibs = {c.rpartition(".")[2]: c for c in cands if c.rpartition(".")[0] == head}
        found = [sibs[m] for m in difflib.get_close_matches(tail, list(sibs), n=n, cutoff=0.6)]
    return found


def did_you_mean(word: str, candidates: Iterable[str], inline: bool = False) -> str:
    """``" Did you mean 'a' or 'b'?"`` (``inline``: ``" (did you mean 'a'?)"``) or ``""``."""
    found = close_matches(word, candidates)
    if not found:
        return ""
    names = " or ".join(repr(f) for f in found)
    return f" (did you mean {names}?)" if inline else f" Did you mean {names}?"


def explain(exc: BaseException, candidates: Iterable[str] | None = None) -> str:
    """A Hydra/OmegaConf error as one message, with the close key names where one is named."""
    text = " ".join(str(exc).split())
    for pattern in _KEY_PATTERNS:
        m = re.search(pattern, str(exc))
        if m:
            key = m.group(1).lstrip("+~")
            if "/" in key:  # Could not find 'experiment/x'
                group = key.partition("/")[0]
                cands = sorted(p.stem for p in (paths.conf_dir() / group).glob("*.yaml"))
            else:
                cands = list(candidates) if candidates is not None else known_keys()
            hint = did_you_mean(key.rpartition("/")[2] if "/" in key else key, cands)
            return f"unknown config key {key!r}: {text}.{hint}"
    return text


def check_group_choices(overrides: Sequence[str], conf: Path | None = None) -> None:
    """``group=option`` overrides name an existing option (Hydra skips a missing optional one)."""
    conf = conf or paths.conf_dir()
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.lstrip("+~")
        if not eq or "." in key or not (conf / key).is_dir() or value in ("null", ""):
            continue
        if not (conf / key / f"{value}.yaml").is_file():
            names = sorted(p.stem for p in (conf / key).glob("*.yaml"))
            shown = ", ".join(names[:12]) + (
                f", ... ({len(names)} in conf/{key}/)" if len(names) > 12 else ""
            )
            raise UsageError(
                f"unknown {key} {value!r} (no conf/{key}/{value}.yaml)."
                f"{did_you_mean(value, names)} Available: {shown}"
            )


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> Any:
    """:func:`cnfgnn.config.compose` for commands: an unknown key or group option becomes a
    :class:`UsageError` naming the close matches.

    Raises:
        UsageError: an unknown key or group option, with the close names.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cnfgnn import config

    check_group_choices(overrides, paths.conf_dir())
    try:
        return config.compose(overrides, config_name)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UsageError(explain(exc)) from None


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a command reports as bad input (exit 2) rather than a crash."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cnfgnn.data.errors import DataError

    out: tuple[type[BaseException], ...] = (
        UsageError,
        DataError,
        HydraException,
        OmegaConfBaseException,
    )
    rounds = sys.modules.get("cnfgnn.federation.rounds")  # not imported: nothing raised it
    return out + ((rounds.FederationError,) if rounds is not None else ())


def console(
    name: str, doc: str | None, work: Callable[[list[str]], Any], argv: Sequence[str] | None = None
) -> int:
    """Run a console command: ``--help`` prints ``doc`` (exit 0); bad input prints
    ``name: message`` on stderr and exits 2; otherwise ``work(args)``'s int status (or 0).

    ``-v``/``--verbose`` anywhere turns on debug logging (see :mod:`cnfgnn.logs`).
    """
    from cnfgnn import logs

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print((doc or name).strip())
        return 0
    verbose = any(a in ("-v", "--verbose") for a in args)
    args = [a for a in args if a not in ("-v", "--verbose")]
    logs.setup(verbose=verbose)
    try:
        status = work(args)
    except Exception as exc:
        if not isinstance(exc, bad_input_errors()):
            raise
        hydra_or_omegaconf = type(exc).__module__.split(".")[0] in ("hydra", "omegaconf")
        message = explain(exc) if hydra_or_omegaconf else str(exc)
        print(f"{name}: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(status) if isinstance(status, int) else 0
