"""haiplatform: HAI-Platform (job API and database, scheduler, node agents, the ``hai`` CLI).

The public face: :class:`HaiClient` (talk to the API from Python) and the exceptions. The
services run as ``python -m haiplatform.api|scheduler|agent --cluster FILE --node NAME``; the
policy (:mod:`haiplatform.policy`), the states (:mod:`haiplatform.states`) and the models
(:mod:`haiplatform.db`) are importable for tools and tests. See docs/haiplatform.md.
"""

from .client import HaiClient
from .errors import (
                     ApiError,
                     AuthError,
                     ConfigError,
                     Conflict,
                     DatabaseError,
                     Forbidden,
                     HaiError,
                     JobSpecError,
                     NotFound,
                     Unavailable,
)

#: the variables every rank gets (the job environment: docs/haiplatform.md)
JOB_ENV = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "NNODES", "NODE_RANK", "GROUP_RANK",
           "MASTER_ADDR", "MASTER_PORT", "HAI_JOB_ID", "HAI_CHAIN_ID", "HAI_ATTEMPT_ID", "HAI_RESTART_COUNT", "HAI_NODE_NAME",
           "HAI_CLUSTER_FILE", "HAI_WHOLE_LIFE_STATE", "HAI_CONTROL")

__all__ = ["HaiClient", "JOB_ENV", "HaiError", "ConfigError", "DatabaseError", "JobSpecError", "ApiError",
           "AuthError", "Forbidden", "NotFound", "Conflict", "Unavailable"]
