"""The miniworld: the embedded synthetic world (generator, tiny models, its grader, profiles,
its assets and main job). Nothing outside it imports it."""
