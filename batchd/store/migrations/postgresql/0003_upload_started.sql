-- an upload's start is recorded so a file whose id was never seen can be found
ALTER TABLE attempts ADD COLUMN upload_started_at DOUBLE PRECISION;
