"""What must be forgotten and the proof it was: forget requests, lineages, supervision ledgers, audit."""
