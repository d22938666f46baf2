-- Upgrades a database created before schema_version had its checksum (the engine core and
-- the claim-path indexes, commits ce64d6c and d6e05ce). Version bc034f8 added the column
-- to CREATE TABLE only, which an existing table never sees; migrate stores the checksum
-- of what it applied there and skips a database whose checksum matches.
ALTER TABLE herder.schema_version ADD COLUMN IF NOT EXISTS checksum text;
