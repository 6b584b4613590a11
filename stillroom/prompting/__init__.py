"""The prompting routes: `stillroom eval` and the baselines of every comparison (zero-shot, k-shot,
chain-of-thought, a fixed system prompt or rulebook). Nothing to build; they deploy a model with a prompt through
the route skeleton (`stillroom.route.run_route`). They live above `stillroom.route`, like every route, so that
`stillroom.evaluate` (the evaluator the skeleton calls) imports nothing above itself."""
