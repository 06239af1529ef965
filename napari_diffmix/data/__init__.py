"""Training data as the trainers see it: checked tiles grouped by where they come from, and the
random crop stream that draws from them."""
