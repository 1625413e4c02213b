"""Flags that several commands share: the limits (README "Limits"), the query
settings (QE, DBA, re-ranking) and the index commands' inputs. Only the
command layer calls these."""

import dataclasses
import math

from absl import flags

from dplg_tf import images


def define_limit_flags(names=tuple(images.LIMIT_FLAGS)):
    """absl flags for the named limits, with the defaults of DEFAULT_LIMITS."""
    for name in names:
        field, help_text = images.LIMIT_FLAGS[name]
        default = getattr(images.DEFAULT_LIMITS, field)
        define = flags.DEFINE_float if isinstance(default, float) else flags.DEFINE_integer
        define(name, default, help_text, lower_bound=0)


def limits_from_flags(names=tuple(images.LIMIT_FLAGS)):
    return dataclasses.replace(images.DEFAULT_LIMITS, **{
        images.LIMIT_FLAGS[n][0]: getattr(flags.FLAGS, n) for n in names})


def scales_from_flag(values, name="scales", limits=None):
    """A list flag of scales as floats (None when not given), checked once:
    numbers, finite, above 0 and, when `limits` are given (dplg-export's own),
    1 to max_scales of them up to max_scale. Commands that hand the scales to
    an exported model leave the bounds to it: its export set them."""
    from dplg_tf.errors import UserError

    if not values:
        return None
    try:
        scales = [float(v) for v in values]
    except ValueError:
        raise UserError(f"--{name} must be numbers separated by commas, got "
                        f"{','.join(values)!r}.") from None
    if not all(math.isfinite(s) for s in scales):
        raise UserError(f"--{name} must be finite numbers, got {','.join(values)!r}.")
    try:
        return (limits.check_scales(scales) if limits is not None
                else images.check_positive_scales(scales))
    except UserError as e:
        raise UserError(f"--{name}: {e}") from None


def define_query_flags(qe=False, dba=False, dba_graph=False, rerank=False):
    """The flags of retrieval.query.Settings that a command takes: --qe_k and
    --qe_alpha, --dba_k and --dba_alpha, --dba_graph, --rerank and its
    re-ranker's settings."""
    from dplg_tf.retrieval import query, rerank as superglobal

    if qe:
        flags.DEFINE_integer("qe_k", 0, "alpha-QE: nearest database vectors added to each "
                             "query (0: off).", lower_bound=0, upper_bound=query.MAX_K)
        flags.DEFINE_float("qe_alpha", 3.0, "alpha-QE: similarity exponent.", lower_bound=0.0,
                           upper_bound=query.MAX_ALPHA)
    if dba:
        flags.DEFINE_integer("dba_k", 0, "DBA: nearest database vectors averaged into each "
                             "database vector, itself included (0: off).", lower_bound=0,
                             upper_bound=query.MAX_K)
        flags.DEFINE_float("dba_alpha", 3.0, "DBA: similarity exponent.", lower_bound=0.0,
                           upper_bound=query.MAX_ALPHA)
    for name in ("qe_alpha",) * qe + ("dba_alpha",) * dba:   # the bounds let nan through
        flags.register_validator(name, lambda v: v is None or math.isfinite(v),
                                 message=f"--{name} must be a finite number")
    if dba_graph:
        flags.DEFINE_enum("dba_graph", "auto", list(query.DBA_GRAPHS), "DBA's neighbour "
                          "graph: exact, ivf (approximate FAISS, its recall printed) or auto "
                          "(exact up to 200,000 descriptors).")
    if not rerank:
        return
    flags.DEFINE_bool("rerank", False, "Re-rank each query's shortlist of --rerank_m with "
                      "--reranker.")
    flags.DEFINE_enum("reranker", "superglobal", sorted(query.RERANKERS), "The re-ranking "
                      "method: superglobal (SuperGlobal's MDescAug + RerankwMDA, global "
                      "descriptors alone).")
    flags.DEFINE_integer("rerank_m", superglobal.DEFAULT_M, "Re-ranking: the shortlist's "
                         "length.", lower_bound=2, upper_bound=superglobal.MAX_M)
    flags.DEFINE_integer("rerank_k", superglobal.DEFAULT_K, "Re-ranking (superglobal): "
                         "neighbours averaged into each shortlist vector, and the best kept "
                         "for the query's maximum descriptor (plus one).", lower_bound=1,
                         upper_bound=superglobal.MAX_M - 1)
    flags.DEFINE_float("rerank_beta", superglobal.DEFAULT_BETA, "Re-ranking (superglobal): "
                       "weight of the neighbours against the vector itself.", lower_bound=0.0,
                       upper_bound=1.0)
    flags.register_validator("rerank_beta", lambda v: math.isfinite(v),
                             message="--rerank_beta must be a finite number")


def settings_from_flags():
    """retrieval.query.Settings of the flags define_query_flags defined,
    checked (a UserError for a bad combination)."""
    from dplg_tf.retrieval import query

    f = flags.FLAGS
    given = {k: getattr(f, k) for k in ("qe_k", "qe_alpha", "dba_k", "dba_alpha", "dba_graph",
                                        "rerank", "reranker") if k in f}
    if "rerank_m" in f:
        params = {"m": f.rerank_m, "k": f.rerank_k, "beta": f.rerank_beta}
        known = query.RERANKERS[given.get("reranker", "superglobal")].defaults
        given["rerank_params"] = {k: v for k, v in params.items() if k in known}
    return query.Settings(**given)


def define_model_flags():
    """--model (a local SavedModel) or --server (and --model_name): the describer."""
    flags.DEFINE_string("model", None, "A SavedModel base path or version folder.")
    flags.DEFINE_string("server", None, "host:port of dplg-serve or TF Serving instead.")
    flags.DEFINE_string("model_name", "dplg", "Model name on the server.")


def define_index_input_flags():
    flags.DEFINE_string("index_dir", None, "The index folder.", required=True)
    define_model_flags()
    flags.DEFINE_string("descriptors", None, "An .npz with descriptors (and names, probe), "
                        "a dplg-extract output folder, an index folder, or an .npy (with "
                        "--allow_unverified).")
    flags.DEFINE_bool("allow_unverified", False, "Accept a descriptor file without a probe "
                      "descriptor (the model that made it is then not checked).")


def index_inputs(argv, command):
    """read_inputs of the flags of define_index_input_flags and the positional paths."""
    from dplg_tf.search.inputs import read_inputs

    f = flags.FLAGS
    paths = list(getattr(f, "images", None) or []) + argv[1:]
    return read_inputs(paths, f.descriptors, f.model, f.server, f.model_name,
                       f.allow_unverified, command)


def define_access_flags(token_for):
    """--allowed_hosts, --cors_origins and --auth_token_file (dplg_tf.http.access)."""
    flags.DEFINE_string("allowed_hosts", None, "Host names answered besides the loopback "
                        "names and --host, comma-separated (*.example.com: its subdomains; "
                        "*: any, for a proxy that checks Host); others get 400.")
    flags.DEFINE_string("cors_origins", None, "Origins whose pages may call the API "
                        "(CORS), comma-separated, e.g. https://app.example.com (*: any); "
                        "none by default.")
    flags.DEFINE_string("auth_token_file", None, "A file holding a token that every "
                        f"request to {token_for} must send as 'Authorization: Bearer "
                        "<token>' (else 401).")


def access_from_flags():
    """The http.access.Access of the flags of define_access_flags."""
    from dplg_tf.http.access import Access, read_token_file, split_list

    f = flags.FLAGS
    token = read_token_file(f.auth_token_file) if f.auth_token_file else None
    return Access(split_list(f.allowed_hosts), split_list(f.cors_origins), token)


def define_http_flags():
    """The timeouts and bounds of an HTTP server (dplg_tf.http.server.HttpLimits)."""
    from dplg_tf.http.server import DEFAULT_HTTP_LIMITS as d

    flags.DEFINE_float("http_header_timeout_s", d.header_timeout, "Seconds a connection may "
                       "take to send a request's headers (from connecting, or from the "
                       "request's first byte); then 408 and closed.", lower_bound=0.01)
    flags.DEFINE_float("http_body_timeout_s", d.body_timeout, "Seconds a request may take to "
                       "send its body after its headers; then 408 and closed.",
                       lower_bound=0.01)
    flags.DEFINE_float("http_keep_alive_s", d.keep_alive, "Seconds an idle connection is "
                       "kept open between requests.", lower_bound=0.01)
    flags.DEFINE_integer("http_max_connections", d.max_connections, "Open connections at "
                         "most; a new one past them is answered 503 and closed.",
                         lower_bound=1)
    flags.DEFINE_integer("http_max_json_depth", d.json_max_depth, "Nesting of arrays and "
                         "objects in a JSON body, at most.", lower_bound=1)
    flags.DEFINE_integer("http_max_json_values", d.json_max_items, "Values in a JSON body, "
                         "at most (checked on its bytes before it is parsed).", lower_bound=1)


def http_limits_from_flags():
    """The HttpLimits of the flags of define_http_flags."""
    from dplg_tf.http.server import HttpLimits

    f = flags.FLAGS
    return HttpLimits(header_timeout=f.http_header_timeout_s,
                      body_timeout=f.http_body_timeout_s, keep_alive=f.http_keep_alive_s,
                      max_connections=f.http_max_connections,
                      json_max_depth=f.http_max_json_depth,
                      json_max_items=f.http_max_json_values)
