"""TF Serving's configuration files, as dplg-serve reads them.

`--model_config_file` is a ModelServerConfig in protobuf text format
(serving/models.config): a `model_config_list` of models, each with a
name, a base path, a `model_version_policy` (latest N, all, specific
versions) and `version_labels`. `--monitoring_config_file` is a
MonitoringConfig (serving/monitoring.config): `prometheus_config { enable,
path }`. Both are parsed by protobuf's text format parser, so a file TF
Serving accepts is read here the same way, and a bad one is refused with
the parser's line and column. ModelService.HandleReloadConfigRequest's
config goes through the same checks (`model_configs_from_proto`).
"""

import dataclasses
import os
import re

from dplg_tf.errors import InputNotFound, UserError

MAX_VERSION = 2 ** 63 - 1   # versions are int64 in TF Serving's protos


def version_number(folder_name):
    """The version a folder's name gives (ASCII digits without leading zeros, at
    most MAX_VERSION), else None."""
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", folder_name):
        return None
    version = int(folder_name)
    return version if version <= MAX_VERSION else None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One served model: `policy` is ("latest", n), ("all",) or ("specific", versions)."""

    name: str
    base_path: str
    policy: tuple = ("latest", 1)
    labels: tuple = ()   # ((label, version), ...) sorted

    def wanted(self, versions):
        """The versions on disk (sorted ints) this model should serve."""
        kind = self.policy[0]
        if kind == "all":
            return list(versions)
        if kind == "specific":
            return [v for v in versions if v in self.policy[1]]
        return list(versions)[-self.policy[1]:]


@dataclasses.dataclass(frozen=True)
class MonitoringConfig:
    enable: bool = False
    path: str = "/monitoring/prometheus/metrics"


def _read(path, what):
    if not os.path.isfile(path):
        raise InputNotFound(f"--{what} {path!r} is not a file.")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--{what} {path!r} cannot be read ({e}).") from None


def _parse(text, message, path, what):
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise UserError(f"--{what} {path!r} is not valid text format: {e}.") from None


def model_configs_from_text(text, path="<text>", base_dir=None):
    """[ModelConfig] of a ModelServerConfig text; relative base paths are
    taken from `base_dir` when given."""
    from tensorflow_serving.config import model_server_config_pb2

    what = "model_config_file"
    proto = _parse(text, model_server_config_pb2.ModelServerConfig(), path, what)
    return model_configs_from_proto(proto, f"--{what} {path!r}", base_dir)


def model_configs_from_proto(proto, where, base_dir=None):
    """[ModelConfig] of a ModelServerConfig message (a config file's, or a
    ReloadConfigRequest's); `where` names it in errors (UserError)."""
    kind = proto.WhichOneof("config")
    if kind is None:
        raise UserError(f"{where} is empty; give a model_config_list {{ config {{ name: ... "
                        "base_path: ... }} }}.")
    if kind != "model_config_list":
        raise UserError(f"{where} needs a model_config_list (custom_model_config "
                        "is not supported).")
    configs, names = [], set()
    for entry in proto.model_config_list.config:
        name = entry.name
        if not name or "/" in name or ":" in name:
            raise UserError(f"{where}: model name {name!r} must be non-empty, "
                            "without '/' or ':'.")
        if name in names:
            raise UserError(f"{where} names model {name!r} twice.")
        names.add(name)
        if not entry.base_path:
            raise UserError(f"{where}: model {name!r} has no base_path.")
        if entry.model_platform not in ("", "tensorflow"):
            raise UserError(f"{where}: model {name!r} has platform "
                            f"{entry.model_platform!r}; only 'tensorflow' is served.")
        base = entry.base_path
        if base_dir is not None and not os.path.isabs(base):
            base = os.path.join(base_dir, base)
        policy = entry.model_version_policy
        kind = policy.WhichOneof("policy_choice") or "latest"
        if kind == "latest":
            n = policy.latest.num_versions or 1
            if n < 1:
                raise UserError(f"{where}: model {name!r} asks for the latest "
                                f"{n} versions; give num_versions >= 1.")
            choice = ("latest", int(n))
        elif kind == "all":
            choice = ("all",)
        else:
            versions = tuple(sorted(int(v) for v in policy.specific.versions))
            if not versions:
                raise UserError(f"{where}: model {name!r} has a specific policy "
                                "with no versions.")
            choice = ("specific", versions)
        labels = tuple(sorted((str(k), int(v)) for k, v in entry.version_labels.items()))
        for label, version in labels:
            if not label or "/" in label or ":" in label:
                raise UserError(f"{where}: label {label!r} of model {name!r} must "
                                "be non-empty, without '/' or ':'.")
            if version < 0:
                raise UserError(f"{where}: label {label!r} of model {name!r} "
                                f"points to version {version}; versions are >= 0.")
        configs.append(ModelConfig(name, base, choice, labels))
    if not configs:
        raise UserError(f"{where} lists no models.")
    return configs


def read_model_config(path):
    """[ModelConfig] of a --model_config_file; relative base paths are taken
    from the working folder, as TF Serving takes them."""
    return model_configs_from_text(_read(path, "model_config_file"), path)


class ModelConfigFile:
    """A --model_config_file that is reread: `configs` is what it said at
    start; poll() gives its models only once the file reads the same at two
    polls in a row and then parses and validates whole, so a writer caught
    between two steps (or half way through one) changes nothing."""

    def __init__(self, path):
        self.path = path
        self._last = _read(path, "model_config_file")
        self.configs = model_configs_from_text(self._last, path)
        self._parsed = self._last

    def poll(self):
        """[ModelConfig] of the file when it is settled, None while it changes;
        UserError when it cannot be read, or has settled but is invalid."""
        text = _read(self.path, "model_config_file")
        settled, self._last = text == self._last, text
        if not settled:
            return None
        if text != self._parsed:
            self.configs = model_configs_from_text(text, self.path)
            self._parsed = text
        return self.configs


def _monitoring_message():
    """MonitoringConfig's message class, built from its two-field schema
    (tensorflow-serving-api does not ship monitoring_config_pb2)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="dplg_monitoring_config.proto",
                                              package="tensorflow.serving", syntax="proto3")
    prometheus = file.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=8, label=1)   # bool
    prometheus.field.add(name="path", number=2, type=9, label=1)     # string
    monitoring = file.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1, type=11, label=1,
                         type_name=".tensorflow.serving.PrometheusConfig")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


def read_monitoring_config(path):
    """MonitoringConfig of a --monitoring_config_file."""
    what = "monitoring_config_file"
    proto = _parse(_read(path, what), _monitoring_message()(), path, what)
    config = proto.prometheus_config
    route = config.path or MonitoringConfig.path
    if not route.startswith("/") or route.startswith("/v1/"):
        raise UserError(f"--{what} {path!r}: prometheus path {route!r} must start with '/' "
                        "and not with /v1/ (the REST API's).")
    return MonitoringConfig(bool(config.enable), route)
