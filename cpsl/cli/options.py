"""Option decorators shared by the command modules. An option whose value lives in a dataclass
(the run config of cpsl/config.py, ExportSettings, DistillSettings) takes its choices, default and
help from that dataclass's field, so each value is declared once."""
from __future__ import annotations

import dataclasses
import inspect

import click

from ..config import PRESETS, Config
from ..errors import CPSLError


def _field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class RegistryChoice(click.Choice):
    """A Choice read from a registry at parse time (entries registered after import count)."""

    def __init__(self, names_fn):
        self._names_fn = names_fn
        super().__init__(list(names_fn()))

    @property
    def choices(self):
        return tuple(self._names_fn())

    @choices.setter
    def choices(self, value):  # click's __init__ assigns; the registry is the truth
        pass


def config_option(path: str, *decls, **kw):
    """An option overriding the run config's ``section.key`` (unset: the preset/config value)."""
    section, key = path.split(".")
    f = _field(type(getattr(Config(), section)), key)
    default, choices = _default(f), f.metadata.get("choices")
    kw.setdefault("type", click.Choice(choices) if choices else type(default))
    kw.setdefault("help", f.metadata.get("help", ""))
    return click.option(*decls, default=None, show_default=f"{path}={default}", **kw)


def _declared() -> list[tuple[str, str]]:
    """``[(section.key, --option), ...]`` of the config fields that declare their own option (metadata
    ``option``, e.g. a strategy's ``--cp-backend``), so a command never names a strategy."""
    return [(f"{sec.name}.{f.name}", f.metadata["option"]) for sec in dataclasses.fields(Config)
            if dataclasses.is_dataclass(sec.default_factory)
            for f in dataclasses.fields(sec.default_factory) if "option" in f.metadata]


def declared_options(fn):
    """Every option of :func:`_declared` (the command takes them as ``**declared``; see :func:`declared_values`)."""
    for path, flag in reversed(_declared()):
        fn = config_option(path, flag, path.replace(".", "__"))(fn)
    return fn


def declared_values(declared: dict) -> dict:
    """``{section.key: value}`` of the parsed :func:`declared_options` (None: unset)."""
    return {k.replace("__", "."): v for k, v in declared.items()}


def config_flag(path: str, *decls):
    """A flag switching the boolean config value ``section.key`` on (unset: the preset/config value)."""
    section, key = path.split(".")
    f = _field(type(getattr(Config(), section)), key)
    return click.option(*decls, is_flag=True, help=f"{f.metadata.get('help', '')} [config {path}]")


def setting_option(cls, name: str, *decls, **kw):
    """An option for the field ``name`` of a settings dataclass (its default shown in --help)."""
    f = _field(cls, name)
    default = _default(f)
    decls = decls or (f"--{name.replace('_', '-')}",)
    kw.setdefault("help", f.metadata.get("help", ""))
    if "registry" in kw:
        kw["type"] = RegistryChoice(kw.pop("registry"))
    elif f.metadata.get("choices"):
        kw.setdefault("type", click.Choice(f.metadata["choices"]))
    elif isinstance(default, bool):
        if "/" not in decls[0]:
            kw.setdefault("is_flag", True)
    elif default is not None:
        kw.setdefault("type", type(default))
    return click.option(*decls, name, default=default, show_default=default is not None, **kw)


def param_option(fn, name: str, *decls, **kw):
    """An option for the keyword ``name`` of the library function ``fn`` (its default, declared there)."""
    default = inspect.signature(fn).parameters[name].default
    return click.option(*decls, name, default=default, show_default=True, type=type(default), **kw)


def settings_from(cls, values: dict):
    """Build ``cls`` from the parsed values of its options."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


# ---------------------------------------------------------------------------- run options
data_option = click.option("--data", "data_path", default=_default(_field(type(Config().data), "path")),
                           show_default=True, help="MMSA .pkl file, or 'synth' for the embedded synthetic data.")
def packaged_config(value):
    """``--config NAME``: a file path, or the name of a config shipped in cpsl/configs (e.g. mosi_best);
    a folder of that name in the working directory (a run called mosi_best) does not hide the shipped one."""
    from pathlib import Path
    if value is None or Path(value).is_file():
        return value
    shipped = Path(__file__).resolve().parents[1] / "configs" / f"{Path(value).stem}.yaml"
    return str(shipped) if shipped.is_file() and Path(value).parent == Path(".") else value


config_file_option = click.option("--config", type=click.Path(), callback=lambda ctx, p, v: packaged_config(v),
                                  help="YAML/JSON config file (sections data, model, loss, cp, train), or the name "
                                       "of a packaged config (mosi_best, mosei_transfer).")
set_option = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a config value (any key of the config; unknown keys are errors).")


def seeds_option(default=None):
    shown = default or f"train.seeds={','.join(map(str, Config().train.seeds))}"
    return click.option("--seeds", default=default, show_default=shown,
                        help="Comma-separated seeds, e.g. 1,2,3 (mean ± std is reported).")


quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace a run already in --out (default: refuse).")
trust_pickle_option = click.option(
    "--trust-pickle", is_flag=True,
    help="UNSAFE: read the .pkl with plain pickle, which runs any code it carries (only for files you made).")


def run_options(preset="teacher", seeds=None):
    """--data --preset --config --set --seeds --epochs --device --threads --quiet: the options of every run
    command (--threads is config train.num_threads)."""
    def deco(fn):
        for opt in reversed((data_option, click.option("--preset", default=preset, show_default=True,
                                                      type=click.Choice(list(PRESETS)), help="Config preset."),
                             config_file_option, set_option, seeds_option(seeds),
                             config_option("train.epochs", "--epochs"), config_option("train.device", "--device"),
                             click.option("--threads", type=click.IntRange(0, 1024), default=None,
                                          show_default="train.num_threads=0",
                                          help="torch CPU threads per process (0: torch's default)."),
                             quiet_option)):
            fn = opt(fn)
        return fn
    return deco


def run_config(preset, config, sets, seeds=None, epochs=None, device=None, quiet=False, threads=None, **cfg_paths):
    """The run config: preset ← config file ← --set ← the dedicated options (``cfg_paths``:
    ``{"train.modulation": value, ...}``; None = unset)."""
    from ..config import build_config, validate
    cfg = build_config(preset, config, sets, check=False)
    if seeds:
        try:
            cfg.train.seeds = [int(s) for s in str(seeds).split(",") if s.strip()]
        except ValueError:
            raise CPSLError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    values = {"train.epochs": epochs, "train.device": device, "train.num_threads": threads, **cfg_paths}
    for path, v in values.items():
        if v is not None:
            section, key = path.split(".")
            setattr(getattr(cfg, section), key, v)
    if quiet:
        cfg.train.progress = False
    validate(cfg)                      # once, the whole result
    device_check(cfg.train.device)
    return cfg


def device_check(device: str) -> None:
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CPSLError(f"device {device!r} requested but torch sees no CUDA GPU")


def deprecated_alias(old: str, new: str, dest: str, **kw):
    """A hidden old option name kept for scripts: parsed into ``dest`` and announced by one note on stderr."""
    def note(ctx, param, value):
        if value not in (None, (), False):
            click.echo(f"note: {old} is deprecated, use {new}", err=True)
        return value
    kw.setdefault("default", None)
    return click.option(old, dest, hidden=True, callback=note, **kw)


def pick(new_value, old_value, new: str, old: str):
    """The value of an option or its deprecated alias (both given: a usage error)."""
    if new_value not in (None, ()) and old_value not in (None, ()):
        raise click.UsageError(f"{new} and {old} are the same option: give one")
    return old_value if new_value in (None, ()) else new_value


threads_option = click.option("--threads", type=click.IntRange(0, 1024), default=None,
                              help="torch CPU threads (0 or unset: torch's default).")
