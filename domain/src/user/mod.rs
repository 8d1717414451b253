//! Users: accounts, their credentials' lifecycle (lockout, revoked tokens) and profile.
