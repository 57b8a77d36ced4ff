"""The command line's arguments checked before absl parses them, so that a mistake in one
ends the program with one line naming it instead of absl's and ml_collections' tracebacks.

`check_config_argument` loads `--config=FILE[:ARG]` as ml_collections will (the file
exists, compiles, defines get_config, accepts ARG); `check_overrides` checks every
`--config.a.b=value` against that config (the field exists, else the closest name; the
value parses as the field's type); `describe_flag_error` turns what absl still raises into
one line.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from pathlib import Path

import ml_collections
from absl import flags

from diffusion_jax.errors import ConfigError, first_line


class UsageError(ValueError):
    """A mistake on the command line; the message is one line naming the argument."""


_OVERRIDE = re.compile(r"^--?(no)?config\.([\w.]+)(?:=(.*))?$", re.DOTALL)


def config_argument(argv: list[str]) -> str | None:
    """The value of --config in argv (`--config=X` or `--config X`), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_config_argument(spec: str) -> ml_collections.ConfigDict:
    """The config `--config=spec` gives, or a UsageError saying why there is none."""
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    where = f"--config={spec}"
    if not path_text:
        raise UsageError(f"{where}: no file given; e.g. --config=configs/digits.py")
    if not path.is_file():
        hint = ""
        folder = path.parent if path.parent.is_dir() else None
        if folder is not None:
            names = sorted(p.name for p in folder.glob("*.py"))
            close = difflib.get_close_matches(path.name, names, n=1)
            if close:
                hint = f"; did you mean {folder / close[0]}?"
            elif names:
                hint = f"; {folder} has {', '.join(names)}"
        raise UsageError(f"{where}: no such file{hint}")
    source = path.read_text()
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        raise UsageError(f"{path}, line {e.lineno}: syntax error ({e.msg})") from e
    spec_obj = importlib.util.spec_from_file_location("diffusion_jax_user_config", path)
    module = importlib.util.module_from_spec(spec_obj)
    try:
        exec(code, module.__dict__)  # noqa: S102 - the user's config file, as config_flags does
    except Exception as e:  # noqa: BLE001 - any failure is reported in one line
        raise UsageError(f"{path}: loading it raised {type(e).__name__}: {first_line(e)}") from e
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"{path}: defines no get_config(arg); a config file returns its config")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError as e:
        raise UsageError(f"{where}: {first_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{where}: get_config raised {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
    return config


def leaf_fields(config, prefix: str = "") -> dict[str, object]:
    """{"section.field": value} of every field of a config."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(leaf_fields(value, name + "."))
        else:
            out[name] = value
    return out


def _type_name(value) -> str:
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _parses_as(value_text: str, like) -> bool:
    """Whether ml_collections' parser of a field holding `like` accepts `value_text`."""
    try:
        if isinstance(like, bool):
            flags.BooleanParser().parse(value_text)
        elif isinstance(like, int):
            flags.IntegerParser().parse(value_text)
        elif isinstance(like, float):
            flags.FloatParser().parse(value_text)
        elif isinstance(like, tuple | list):
            parsed = ast.literal_eval(value_text)
            return isinstance(parsed, tuple | list)
    except (ValueError, SyntaxError, TypeError):
        return False
    return True


def check_overrides(argv: list[str], config: ml_collections.ConfigDict) -> None:
    """Every --config.a.b override names a field of `config` with a value of its type."""
    fields = leaf_fields(config)
    for i, arg in enumerate(argv):
        match = _OVERRIDE.match(arg)
        if not match:
            continue
        negated, name, value = match.groups()
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean --config.{close[0]}?" if close else ""
            raise UsageError(f"--config.{name}: no such config field{hint}")
        like = fields[name]
        if value is None and not negated and i + 1 < len(argv) and not isinstance(like, bool):
            value = argv[i + 1]
        if value is None or isinstance(like, str) or like is None:
            continue
        if not _parses_as(value, like):
            raise UsageError(
                f"--config.{name}={value}: expects {_type_name(like)} (config.{name} is {like!r})"
            )


def describe_flag_error(error: flags.Error, flag_names) -> str:
    """One line for what absl raised while parsing the flags."""
    if isinstance(error, flags.UnrecognizedFlagError):
        name = error.flagname
        close = difflib.get_close_matches(name, list(flag_names), n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help"
        return f"--{name}: no such flag{hint}"
    text = first_line(error)
    required = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", text)
    if required:
        example = {
            "workdir": "--workdir=runs/digits",
            "config": "--config=configs/digits.py",
        }.get(required.group(1), "")
        return f"--{required.group(1)}: required{'; e.g. ' + example if example else ''}"
    return text.removeprefix("flag ")
