-- Demo data: a small shop with many column types. Re-running it starts over.
DROP SCHEMA IF EXISTS shop CASCADE;
CREATE SCHEMA shop;
CREATE TYPE shop.order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
CREATE DOMAIN shop.email AS text CHECK (VALUE LIKE '%@%');

CREATE TABLE shop.customers (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email shop.email,
    country char(2),
    signed_up_at timestamptz NOT NULL,
    birthday date,
    balance numeric(12, 2),
    active boolean NOT NULL,
    tags text[],
    profile jsonb,
    last_ip inet,
    external_id uuid
);
COMMENT ON TABLE shop.customers IS 'People who signed up for the shop.';

CREATE TABLE shop.products (
    sku text PRIMARY KEY,
    title text NOT NULL,
    price numeric(10, 2) NOT NULL,
    weight_kg real,
    dimensions_cm double precision[],
    description text,
    added_on date
);

CREATE TABLE shop.orders (
    id bigint PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES shop.customers (id),
    status shop.order_status NOT NULL,
    total numeric(12, 2) NOT NULL,
    ordered_at timestamptz NOT NULL,
    delivery_window interval,
    notes text
);

CREATE TABLE shop.order_lines (
    order_id bigint REFERENCES shop.orders (id),
    line_no int,
    sku text REFERENCES shop.products (sku),
    quantity smallint NOT NULL,
    unit_price numeric(10, 2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

INSERT INTO shop.customers
SELECT i,
       initcap(md5(i::text)::varchar(8)) || ' ' || initcap(md5((i * 7)::text)::varchar(10)),
       'user' || i || '@example.com',
       (ARRAY['DE', 'FR', 'US', 'BR', 'JP', 'IN'])[1 + i % 6],
       timestamptz '2023-01-01 00:00:00+00' + (i * interval '17 minutes 3.123456 seconds'),
       CASE WHEN i % 10 = 0 THEN NULL ELSE date '1960-01-01' + (i * 37) % 18000 END,
       round((i % 100000) / 7.0, 2),
       i % 9 <> 0,
       CASE WHEN i % 4 = 0 THEN ARRAY['vip', 'newsletter'] WHEN i % 4 = 1 THEN '{}'::text[] ELSE ARRAY['ü-tag'] END,
       jsonb_build_object('plan', (ARRAY['free', 'pro', 'team'])[1 + i % 3], 'seats', i % 50),
       ('10.' || (i % 250) || '.' || (i % 200) || '.' || (i % 100))::inet,
       md5(i::text)::uuid
FROM generate_series(1, 20000) AS i;

INSERT INTO shop.products
SELECT 'SKU-' || lpad(i::text, 5, '0'),
       'Product ' || i,
       round((5 + (i * 13) % 500)::numeric + 0.99, 2),
       ((i % 40) / 4.0)::real,
       ARRAY[10 + i % 30, 20 + i % 15, 5 + i % 7]::float8[],
       repeat('Lorem ipsum dolor sit amet. ', 1 + i % 5),
       date '2020-01-01' + i
FROM generate_series(1, 2000) AS i;

INSERT INTO shop.orders
SELECT i,
       1 + (i * 7919) % 20000,
       (ARRAY['new', 'paid', 'shipped', 'cancelled']::shop.order_status[])[1 + i % 4],
       round(((i * 31) % 100000) / 100.0, 2),
       timestamptz '2024-01-01 00:00:00+00' + (i * interval '3 minutes'),
       CASE WHEN i % 3 = 0 THEN NULL ELSE make_interval(days => i % 5, hours => i % 24) END,
       CASE WHEN i % 5 = 0 THEN 'leave at the door; ring twice' END
FROM generate_series(1, 100000) AS i;

INSERT INTO shop.order_lines
SELECT o, l, 'SKU-' || lpad((1 + (o * l) % 2000)::text, 5, '0'), 1 + (o + l) % 4, round((5 + (o * l) % 500) + 0.99, 2)
FROM generate_series(1, 100000) AS o, generate_series(1, 3) AS l;

ANALYZE;
