-- Masking: no personal data leaves production. Names, e-mail addresses and phone numbers
-- become stable pseudonyms derived from the row id.
UPDATE customers SET
    name  = 'person-' || md5(id::text),
    email = 'user' || id || '@masked.invalid',
    phone = '+0-000-' || lpad((id % 10000000)::text, 7, '0');
ANALYZE customers;
