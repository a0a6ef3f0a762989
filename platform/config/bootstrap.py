"""gin bootstrap: search paths, imports, parsing with one-line errors, type checks, flattening.

gin state is per process. The launcher parses files + bindings once and ships
`gin.config_str()` to workers, which call `parse_config_string`.

Imports: a gin file may start with `import my_lab.objectives` (dopamine style): gin imports the
module, whose own `@gin.register` / `@gin.configurable` decorators make its components available.
That runs the module's code, like running a Python file: the user's trust decision
(docs/reliability.md). Dynamic registration (`from __gin__ import dynamic_registration`, which would
let a file call any imported function such as os.system) stays refused, so a config reaches only
registered configurables.
"""
from __future__ import annotations

import difflib
import importlib.util  # noqa: F401  gin's include path needs it loaded, else a confusing AttributeError
import inspect
import os
import re
import tokenize
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence

import gin

from selfflow.platform.errors import ConfigError, first_line


def _experiments_dir() -> Path:
    """The shipped gin files: the installed `selfflow.experiments` package (the repository's
    experiments/ folder in an editable install), or SELFFLOW_EXPERIMENTS."""
    override = os.environ.get("SELFFLOW_EXPERIMENTS")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("selfflow.experiments")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the shipped experiments are missing: reinstall selfflow (package selfflow.experiments)")
    return Path(list(spec.submodule_search_locations)[0])


EXPERIMENTS_DIR = _experiments_dir()

_LOCATION = re.compile(r'In (?:file "(?P<file>[^"]+)", line (?P<line>\d+)|bindings string line (?P<bline>\d+))')


def _drop_python_path_reader() -> None:
    # gin also resolves an include 'a/b.gin' by importing a Python package `a`
    # (its resource reader): a gin file could import arbitrary modules that way
    # and every include logs a spurious ERROR. We resolve includes through
    # search paths only, so that reader goes.
    from gin import resource_reader

    gin.config._FILE_READERS[:] = [
        entry for entry in gin.config._FILE_READERS if entry[0] is not resource_reader.system_path_reader
    ]


class _ForbiddenImport(ConfigError):
    """A gin file asked for dynamic registration (`from __gin__ import dynamic_registration`)."""


class _FailedImport(ConfigError):
    """A module a gin file imports cannot be found."""


class UserModuleError(Exception):
    """The code of a module a gin file imports raised; `__cause__` is its exception."""


_gin_process_import = gin.config.ParseContext.process_import


def _checked_import(self, statement) -> None:
    if statement.is_from and statement.module.startswith("__gin__"):
        raise _ForbiddenImport(
            f"gin 'from __gin__ import {statement.module.partition('.')[2]}' is not allowed: dynamic registration would "
            f"let a config "
            f"call any imported function; register components in their module with @gin.register instead"
        )
    try:
        importlib.util.find_spec(statement.module.split(".")[0])
        found = importlib.util.find_spec(statement.module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise _FailedImport(f"gin 'import {statement.module}': no such module (is its package installed, "
                            f"or its folder on PYTHONPATH?)")
    try:
        _gin_process_import(self, statement)
    except Exception as error:  # the user's code: parse() re-raises it with its own type and traceback
        raise UserModuleError(statement.module) from error


def _police_imports() -> None:
    gin.config.ParseContext.process_import = _checked_import


def _register_search_paths() -> None:
    _drop_python_path_reader()
    _police_imports()
    # gin resolves includes against the working directory and registered search
    # paths, never against the including file: register the experiments folder.
    for path in (EXPERIMENTS_DIR, EXPERIMENTS_DIR.parent):
        if str(path) not in gin.config._LOCATION_PREFIXES:
            gin.add_config_file_search_path(str(path))


def resolve_config_file(name: str | os.PathLike) -> Path:
    """Find a gin file as given, relative to the cwd, or inside experiments/."""
    candidates = [Path(name), EXPERIMENTS_DIR / name]
    if not str(name).endswith(".gin"):
        candidates += [Path(f"{name}.gin"), EXPERIMENTS_DIR / f"{name}.gin"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file not found: {name} (looked in ., {EXPERIMENTS_DIR})")


def parse(gin_files: Sequence[str | os.PathLike], gin_params: Sequence[str] = (), *, finalize: bool = True) -> str:
    """Parse files then bindings (bindings win). Returns the resulting config string."""
    from selfflow.platform.config import registry  # here: the CLI reads gin files before torch loads

    registry.register_all()
    _register_search_paths()
    gin.clear_config()
    files = [str(resolve_config_file(f)) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(files, list(gin_params), finalize_config=False, skip_unknown=False)
    except UserModuleError as error:
        raise _user_error(error)
    except Exception as error:  # gin raises many types; all become one line
        raise _friendly(error, files, gin_params) from None
    check_types(files, gin_params)
    if finalize:
        _finalize(files, gin_params)
    return gin.config_str()


def parse_config_string(config: str, overrides: Sequence[str] = ()) -> None:
    """Rebuild the driver's gin state in another process (Ray worker)."""
    from selfflow.platform.config import registry  # here: the CLI reads gin files before torch loads

    registry.register_all()
    _register_search_paths()
    gin.clear_config()
    try:
        gin.parse_config(config)
        if overrides:
            gin.parse_config(list(overrides))
    except UserModuleError as error:
        raise _user_error(error)
    except Exception as error:
        raise _friendly(error, [], overrides) from None
    _finalize([], overrides)


def _user_error(error: BaseException) -> BaseException:
    """The exception a gin-imported module raised (gin may wrap ours in a proxy class)."""
    cause = error.__cause__
    return cause if isinstance(cause, BaseException) else error


def _finalize(files: Sequence[str], params: Sequence[str]) -> None:
    """gin.finalize with one-line errors: it checks every macro (%NAME) has a value, and raises a
    ValueError holding the whole config otherwise."""
    try:
        gin.finalize()
    except Exception as error:
        macro = re.search(r"No bindings specified for '([^'/]+)/gin\.macro'", str(error))
        if macro:
            name = macro.group(1)
            where = _locate_text(files, params, re.compile(rf"%{re.escape(name)}\b"))
            raise ConfigError(f"{where}macro %{name} is used but never bound (bind it: {name} = ...)") from None
        raise ConfigError(first_line(error)) from None


def _include_cycle(files: Sequence[str]) -> list[str] | None:
    """The first chain of includes that leads back to a file already on it (a -> b -> a), or None."""
    def visit(file: str, chain: list[str]) -> list[str] | None:
        if file in chain:
            return chain[chain.index(file):] + [file]
        try:
            text = Path(file).read_text()
        except (OSError, UnicodeDecodeError):
            return None
        for include in re.findall(r"^include\s+['\"]([^'\"]+)['\"]", text, flags=re.M):
            target = _resolve_include(include)
            if target is None:
                continue
            found = visit(target, chain + [file])
            if found:
                return found
        return None

    for file in files:
        found = visit(str(file), [])
        if found:
            return found
    return None


def _resolve_include(name: str) -> str | None:
    """Where gin finds an include: the working directory, then its search paths (the experiments
    folder and its parent)."""
    try:
        return str(resolve_config_file(name))
    except ConfigError:
        candidate = EXPERIMENTS_DIR.parent / name
        return str(candidate.resolve()) if candidate.is_file() else None


def _malformed_part(files: Sequence[str], params: Sequence[str]) -> str:
    """Which input fails gin's syntax on its own: '--gin_param N: ' or 'FILE: ' ('' if none does).
    gin parses the bindings as one string, so its own error names no binding."""
    from gin import config_parser

    def malformed(text: str) -> bool:
        try:
            for _ in config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True)):
                pass
        except (SyntaxError, tokenize.TokenError, ValueError, IndexError):
            return True
        except Exception:  # a reference gin cannot resolve: not a syntax problem
            return False
        return False

    for index, binding in enumerate(params, start=1):
        if malformed(binding):
            return f"--gin_param {index}: "
    for file in reversed(list(files)):
        try:
            if malformed(Path(file).read_text()):
                return f"{file}: "
        except (OSError, UnicodeDecodeError):
            continue
    return ""


def _friendly(error: Exception, files: Sequence[str], params: Sequence[str]) -> ConfigError:
    text = str(error)
    first = first_line(error)
    if isinstance(error, RecursionError):
        cycle = _include_cycle(files)
        if cycle:
            return ConfigError("include cycle: " + " -> ".join(Path(f).name for f in cycle))
    where = ""
    match = _LOCATION.search(text)
    if match and match.group("file"):
        where = f'{match.group("file")}:{match.group("line")}: '
    elif match and match.group("bline"):
        where = f"--gin_param {match.group('bline')}: "
    if isinstance(error, (_ForbiddenImport, _FailedImport)):
        return ConfigError(f"{where}{first}")
    if isinstance(error, OSError) and "Unable to open file" in text:
        missing = re.search(r"Unable to open file: ([^\s]+?)\.\s", text + " ")
        name = missing.group(1) if missing else text
        return ConfigError(f"{where}config file not found: {name} (search paths: ., {EXPERIMENTS_DIR})")
    if isinstance(error, (tokenize.TokenError, SyntaxError)) or "Expected" in first or "Malformed" in first:
        return ConfigError(f"{where or _malformed_part(files, params) or _guess_file(files)}malformed gin syntax: "
                           f"{first}")
    unknown_param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
    if unknown_param:
        configurable, param = unknown_param.groups()
        hint = _suggest(param, _parameters_of(configurable))
        return ConfigError(f"{where}unknown parameter '{param}' of {configurable}{hint}")
    unknown_conf = re.search(r"No configurable matching (?:reference )?'@?([^']+)'", text)
    if unknown_conf:
        name = unknown_conf.group(1)
        hint = _suggest(name.split(".")[-1], _configurable_names())
        return ConfigError(f"{where}unknown configurable '{name}'{hint}")
    return ConfigError(f"{where}{first}")


def _guess_file(files: Sequence[str]) -> str:
    return f"{files[-1]}: " if files else ""


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _configurable_names() -> list[str]:
    names = []
    for selector, _ in gin.config._REGISTRY.items():
        names.append(selector.split(".")[-1])
    return names


def _target_of(configurable: str):
    try:
        return gin.config._REGISTRY.get_match(configurable).wrapped
    except Exception:
        return None


def _parameters_of(configurable: str) -> list[str]:
    target = _target_of(configurable)
    if target is None:
        return []
    function = target.__init__ if inspect.isclass(target) else target
    return [p for p in inspect.signature(function).parameters if p != "self"]


_SIMPLE_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _accepts(annotation: Any, value: Any) -> bool:
    """True when `value` fits a simple annotation; unknown annotations accept anything."""
    if value is None or isinstance(value, gin.config.ConfigurableReference) or annotation is Any:
        return True
    if type(value).__name__ in {"ConfigurableReference", "_UnknownConfigurableReference", "MacroReference"}:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if origin in (tuple, list, typing.Sequence) or annotation in (tuple, list):
        return isinstance(value, (tuple, list))
    if annotation in _SIMPLE_TYPES:
        if isinstance(value, bool) and annotation is not bool:
            return False
        return isinstance(value, _SIMPLE_TYPES[annotation])
    return True


def check_types(files: Sequence[str], params: Sequence[str]) -> None:
    """gin does no type checking: compare every bound literal with the annotation."""
    for (scope, selector), bindings in gin.config._CONFIG.items():
        target = _target_of(selector)
        if target is None:
            continue
        function = target.__init__ if inspect.isclass(target) else target
        try:
            hints = typing.get_type_hints(function)
        except Exception:
            continue
        for name, value in bindings.items():
            if name in hints and not _accepts(hints[name], value):
                short = selector.split(".")[-1]
                where = _locate_binding(files, params, short, name)
                expected = getattr(hints[name], "__name__", str(hints[name]))
                raise ConfigError(
                    f"{where}wrong type for {short}.{name}: got {value!r} ({type(value).__name__}), expected {expected}"
                )


def _locate_binding(files: Sequence[str], params: Sequence[str], configurable: str, name: str) -> str:
    return _locate_text(files, params, re.compile(rf"(^|[/.\s]){re.escape(configurable)}\.{re.escape(name)}\s*="))


def _locate_text(files: Sequence[str], params: Sequence[str], pattern: re.Pattern) -> str:
    """'--gin_param N: ' or 'FILE:LINE: ' of the last place `pattern` occurs (bindings win), or ''."""
    for index, binding in reversed(list(enumerate(params, start=1))):
        if pattern.search(binding):
            return f"--gin_param {index}: "
    for file in reversed(list(_expand_includes(files))):
        for number, line in enumerate(Path(file).read_text().splitlines(), start=1):
            if pattern.search(line.split("#", 1)[0]):  # comments do not count
                return f"{file}:{number}: "
    return ""


def peek_binding(files: Sequence[str | os.PathLike], params: Sequence[str], selector: str) -> str | None:
    """The literal value of `selector` (e.g. TrainConfig.host) as the files (and their includes) and
    then the bindings set it, read as text: for settings needed before torch (and the registry) load.
    None when nothing sets it or a file cannot be read (the real parse reports that)."""
    pattern = re.compile(rf"^\s*{re.escape(selector)}\s*=\s*(['\"])(?P<value>[^'\"]*)\1")
    value = None
    try:
        lines = [line for file in _expand_includes([str(resolve_config_file(f)) for f in files])
                 for line in Path(file).read_text().splitlines()]
    except (ConfigError, OSError, UnicodeDecodeError, RecursionError):
        return None
    for line in [*lines, *params]:
        match = pattern.match(line)
        if match:
            value = match.group("value")
    return value


def _expand_includes(files: Sequence[str]) -> Iterable[str]:
    for file in files:
        text = Path(file).read_text()
        for include in re.findall(r"^include\s+['\"]([^'\"]+)['\"]", text, flags=re.M):
            try:
                yield from _expand_includes([str(resolve_config_file(include))])
            except ConfigError:
                continue
        yield file


def flatten_config(config: str) -> dict[str, str]:
    """Flatten a gin config string to {'Configurable.param': 'value'} for MLflow params."""
    flat: dict[str, str] = {}
    statement = ""
    for raw in config.splitlines():
        line = raw.split("#", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        if statement and (raw.startswith(" ") or raw.startswith("\t")):
            statement += " " + line.strip()
            continue
        if statement:
            _add_binding(flat, statement)
        statement = line.strip()
    if statement:
        _add_binding(flat, statement)
    return flat


def _add_binding(flat: dict[str, str], statement: str) -> None:
    if "=" not in statement or statement.startswith(("import ", "include ")):
        return
    key, value = statement.split("=", 1)
    flat[key.strip()] = value.strip()
