"""The shapes world: GenEval's six tags over flat shapes, with a renderer and a verifier."""
