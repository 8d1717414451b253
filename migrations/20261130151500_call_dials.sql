-- Toll-fraud and harassment limits (usecases::calls::dials): one row per call counted toward
-- the daily limits of its number (across every user) and of its user, written with the
-- request of a call now, or by the dialer when a scheduled call fires.
CREATE TABLE call_dials
(
    call_id    uuid PRIMARY KEY,
    user_id    uuid        NOT NULL,
    phone      text        NOT NULL,
    day        date        NOT NULL,
    claimed_at timestamptz NOT NULL
);
CREATE INDEX call_dials_phone_day ON call_dials (phone, day);
CREATE INDEX call_dials_user_day ON call_dials (user_id, day);
