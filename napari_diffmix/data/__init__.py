"""The data model and training data: tiles and datasets (:mod:`.tiles`), and the random crop
stream the trainers draw from (:mod:`.crops`)."""
