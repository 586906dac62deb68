-- The admin key generated at first start when no key was configured (its SHA-256), shared by every node.
CREATE TABLE generated_keys (
    slot INTEGER PRIMARY KEY CHECK (slot = 1),
    sha256 TEXT NOT NULL
);

-- Each key's own S3 bucket per deploy type (update_s3), as JSON; the secret is in it, so access to this
-- database is access to those buckets.
CREATE TABLE destinations (
    owner TEXT NOT NULL,
    deploy_type TEXT NOT NULL,
    settings TEXT NOT NULL,
    PRIMARY KEY (owner, deploy_type)
);
