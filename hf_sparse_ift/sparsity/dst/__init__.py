"""Dynamic sparse training (DST): evolve the masks of a model's `SparseLinear` layers while it trains.

The engine is separate from the model and from the training loop; each method (static, SET, RigL, SRigL,
...) is one small file in `methods/`. In your own loop, call ``engine.step()`` after every real optimizer step:

    engine = DSTEngine(model, optimizer, DSTConfig(method="set"), total_steps=10_000)
    for batch in loader:
        model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()
        engine.step()            # every ΔT steps: drop / regrow in every sparse layer
"""

from ..._lazy import lazy_exports

_EXPORTS = {
    "DSTConfig": ".config",
    "DSTEngine": ".engine",
    "summarize": ".engine",
    "METHODS": ".methods",
    "DSTMethod": ".methods",
    "LayerUpdate": ".methods",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
