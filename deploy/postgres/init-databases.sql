-- Run once by the postgres image on an empty data directory (docker-compose.yml mounts it into
-- /docker-entrypoint-initdb.d). The services also create their database if it is missing.
CREATE DATABASE credit_proxy_billing;
CREATE DATABASE credit_proxy_credits;
