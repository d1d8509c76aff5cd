#!/bin/sh
# Runs as the postgres user against the image's private instance (PGHOST, PGPORT, PGUSER
# and PGDATABASE are set by blockd).
set -eu
pgbench -i -q -s "${DEMO_SCALE:-5}" >/dev/null
psql -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE TABLE customers (
    id    int PRIMARY KEY,
    name  text NOT NULL,
    email text NOT NULL,
    phone text NOT NULL
);
INSERT INTO customers
SELECT i, 'Customer ' || i, 'customer' || i || '@example.com', '+1-555-' || lpad(i::text, 7, '0')
FROM generate_series(1, 10000) AS i;
SQL
