"""The base of BrokerState's mixins (clients.ClientSide, workers.WorkerSide,
dispatch.Dispatch).

A mixin reaches BrokerState's attributes and methods through ``self``; naming
BrokerState as its base would be an import cycle, so type checkers see an Any base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    class StateMixin(Any):  # type: ignore[misc]
        pass

else:
    StateMixin = object
