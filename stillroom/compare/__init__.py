"""`stillroom compare`: one task, one teacher, one student, every route, one report."""
