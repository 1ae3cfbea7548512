"""Thin Hydra entry points (pgan-train, pgan-eval) and what they share: a one-line report of a bad override."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NoReturn

from pgan.errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
EXIT_USER_ERROR = 2

# Lines of Hydra's error messages that are advice about Hydra itself, not about the user's mistake.
_NOISE = ("See https://", "Set the environment", "Config search path", "provider=", "full_key", "object_type")


def hydra_error_line(exc: Exception) -> str:
    """One line for a Hydra composition error: the culprit key or option and what to do."""
    from hydra.errors import MissingConfigException

    text = str(exc)
    missing = re.search(r"Could not find '([\w./-]+)/([^'/]+)'", text)
    if isinstance(exc, MissingConfigException) and missing and getattr(exc, "options", None):
        group, option = missing.groups()
        return f"{group}={option}: no such option in conf/{group}/; choose one of {', '.join(exc.options)}"
    unknown = re.search(r"Could not override '([^']+)'\.\s*To append to your config use (\S+)", text)
    if unknown:
        return f"{unknown.group(1)}: no such key in the config (a typo? to add a new key use {unknown.group(2)})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
    return "; ".join(lines) or type(exc).__name__


def exit_on_bad_overrides(config_name: str, args: list[str]) -> None:
    """Compose `config_name` with `args` once and, if Hydra refuses them, print one line and exit 2 (Hydra's
    own report is several lines and exits 1). Flags (--help, -m, --cfg ...) are left to Hydra."""
    if any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            compose(config_name=config_name, overrides=list(args))
    except OverrideParseException as exc:
        # Name the override that does not parse (Hydra's message only quotes the bad fragment).
        parser = OverridesParser.create()
        culprit = next((a for a in args if not _parses(parser, a)), None)
        line = hydra_error_line(exc)
        print(
            f"error: {culprit}: cannot parse this override ({line})" if culprit else f"error: {line}", file=sys.stderr
        )
        sys.exit(EXIT_USER_ERROR)
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {hydra_error_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def _parses(parser, override: str) -> bool:
    from hydra.errors import HydraException

    try:
        parser.parse_override(override)
    except HydraException:
        return False
    return True


def user_error_line(exc: UserError) -> str:
    """The user-facing line of a UserError, also when a DataLoader worker raised it.

    torch re-raises a worker's exception with the worker's traceback prepended to its message; the
    original message is the last line, after the exception's qualified name.
    """
    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return last.removeprefix(f"{UserError.__module__}.{UserError.__qualname__}: ")


def exit_with_user_error(exc: UserError) -> NoReturn:
    """Print `error: <the one line>` on stderr and exit with EXIT_USER_ERROR (2)."""
    print(f"error: {user_error_line(exc)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def checked_resolutions(value: object, not_a_list: str) -> list[int]:
    """`value` (pgan-bench's and pgan-prepare's `resolutions`) as a list of valid resolutions in px; else a
    UserError: `not_a_list` (followed by the value) for no list or an empty one, else one naming the bad entry."""
    from omegaconf import OmegaConf

    from pgan.errors import check_int
    from pgan.schedule import check_resolution

    if not OmegaConf.is_list(value) or not value:
        raise UserError(f"{not_a_list}, got {value!r}")
    resolutions = [check_int("each of resolutions", res) for res in value]
    for res in resolutions:
        try:
            check_resolution(res)
        except ValueError as exc:
            raise UserError(f"resolutions: {exc}") from exc
    return resolutions
