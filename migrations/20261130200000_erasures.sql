-- Erasures under way (usecases::accounts::erasure, README "Privacy"). A row is written before
-- the account records `UserErased` and marked finished when every clean-up step is done; an
-- erasure interrupted midway (a crash, Stripe unreachable) is finished by the `erasures`
-- worker (serve::erasures) from here: `UserErased` in the log says the account is gone, this
-- row says what is left to do.
CREATE TABLE erasures
(
    user_id         uuid PRIMARY KEY,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    -- when the worker may (next) take it up; the request itself runs the steps first
    next_attempt_at timestamptz NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    finished_at     timestamptz
);
CREATE INDEX erasures_due ON erasures (next_attempt_at) WHERE finished_at IS NULL;
