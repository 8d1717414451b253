//! Users: registration, profile, sign-in attempts (with lockout), passwords, revoked tokens
//! and sessions revoked all at once (a session epoch: tokens of an older epoch are refused).
//!
//! Lockout is per account *and client*: failures are counted per client (an opaque key the
//! service derives from the client's address), so a stranger who fails ten times locks only
//! themselves out of this account, and its owner still signs in from anywhere else. Failures
//! older than the lockout period are forgotten, so the state stays small. (Events written
//! before clients were recorded carry none: their counts and lock were account-wide.)
//!
//! Uniqueness of email and phone spans users, so it is not this aggregate's to decide: the
//! service reserves them (a unique index) before sending `Register` or a profile change.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::values::{Email, PhoneNumber};

/// Failed sign-ins from one client (each within the lockout period of the last) that lock the
/// account for that client.
pub const LOCKOUT_THRESHOLD: u32 = 10;
/// How long a lock lasts, and how long a failure is remembered.
pub const LOCKOUT_MINUTES: i64 = 30;

#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    Register {
        name: String,
        email: Email,
        phone: PhoneNumber,
        password_hash: String,
    },
    UpdateProfile {
        name: Option<String>,
        email: Option<Email>,
        phone: Option<PhoneNumber>,
    },
    /// A sign-in attempt from `client`, already checked against the password hash by the
    /// service.
    RecordSignIn {
        succeeded: bool,
        at: DateTime<Utc>,
        client: String,
    },
    RevokeToken {
        token_id: String,
        expires_at: DateTime<Utc>,
    },
    /// A new password (already hashed; the service checked the current one or a reset token).
    /// Every session is revoked with it: the caller gets a token of the new epoch.
    ChangePassword {
        password_hash: String,
        at: DateTime<Utc>,
        reset: bool,
    },
    /// Sign out everywhere: every token issued so far stops working.
    RevokeAllSessions { at: DateTime<Utc> },
    /// A new account from a WorkOS sign-in: no password and no phone yet.
    RegisterWithWorkos {
        name: String,
        email: Email,
        workos_user_id: String,
        email_verified: bool,
    },
    /// Links the WorkOS user to this account (the service checked WorkOS verified the email).
    LinkWorkos {
        workos_user_id: String,
        email_verified: bool,
    },
    /// The account is erased at its owner's request: every session ends, and the aggregate
    /// forgets its personal data (what the log still holds is the erasure's to deal with).
    Erase { at: DateTime<Utc> },
    /// A sign-in through WorkOS, already authenticated by WorkOS (code exchanged).
    RecordWorkosSignIn {
        workos_user_id: String,
        organization_id: Option<String>,
        method: String,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    UserRegistered {
        name: String,
        email: Email,
        phone: PhoneNumber,
        password_hash: String,
    },
    ProfileUpdated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<Email>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        phone: Option<PhoneNumber>,
    },
    SignInFailed {
        at: DateTime<Utc>,
        /// Failures in a row from this client (from anyone, when `client` is absent).
        consecutive: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    /// Locked for `client` (for everyone, when absent) until `until`.
    AccountLocked {
        until: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    SignedIn {
        at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    TokenRevoked {
        token_id: String,
        expires_at: DateTime<Utc>,
    },
    /// The password was changed (`reset`: through an emailed reset link). Unlocks the account.
    PasswordChanged {
        password_hash: String,
        at: DateTime<Utc>,
        reset: bool,
    },
    /// Every token of an epoch below `epoch` is refused from now on.
    SessionsRevoked { epoch: u32, at: DateTime<Utc> },
    /// An account created by a WorkOS sign-in (no password, no phone).
    UserRegisteredWithWorkos {
        name: String,
        email: Email,
        workos_user_id: String,
        email_verified: bool,
    },
    /// The WorkOS user now signs in to this account.
    WorkosLinked {
        workos_user_id: String,
        email_verified: bool,
    },
    /// Erased at its owner's request. Carries no personal data.
    UserErased { at: DateTime<Utc> },
    /// Signed in through WorkOS (`method`: WorkOS's `authentication_method`, e.g. `Password`,
    /// `SSO`, `GoogleOAuth`; `organization_id` for an organisation's connection).
    SignedInWithWorkos {
        at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        organization_id: Option<String>,
        method: String,
    },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            UserEvent::UserRegistered { .. } => "UserRegistered",
            UserEvent::ProfileUpdated { .. } => "ProfileUpdated",
            UserEvent::SignInFailed { .. } => "SignInFailed",
            UserEvent::AccountLocked { .. } => "AccountLocked",
            UserEvent::SignedIn { .. } => "SignedIn",
            UserEvent::TokenRevoked { .. } => "TokenRevoked",
            UserEvent::PasswordChanged { .. } => "PasswordChanged",
            UserEvent::SessionsRevoked { .. } => "SessionsRevoked",
            UserEvent::UserRegisteredWithWorkos { .. } => "UserRegisteredWithWorkos",
            UserEvent::WorkosLinked { .. } => "WorkosLinked",
            UserEvent::SignedInWithWorkos { .. } => "SignedInWithWorkos",
            UserEvent::UserErased { .. } => "UserErased",
        }
        .to_string()
    }
    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UserError {
    #[error("user not found")]
    NotFound,
    #[error("this account already exists")]
    AlreadyRegistered,
    #[error("the account is locked until {until}")]
    Locked { until: DateTime<Utc> },
    #[error("this account is linked to another WorkOS user")]
    OtherWorkosUser,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub registered: bool,
    pub name: String,
    pub email: Option<Email>,
    pub phone: Option<PhoneNumber>,
    pub password_hash: String,
    /// Failures in a row and the lock of events that name no client (account-wide).
    pub failed_sign_ins: u32,
    pub locked_until: Option<DateTime<Utc>>,
    /// Per client: failures in a row and when the last was (forgotten after the lockout
    /// period).
    #[serde(default)]
    pub client_failures: BTreeMap<String, (u32, DateTime<Utc>)>,
    /// Per client: locked until.
    #[serde(default)]
    pub client_locks: BTreeMap<String, DateTime<Utc>>,
    pub registered_at: Option<DateTime<Utc>>,
    /// Tokens carry the epoch they were issued in; those below this one are refused.
    #[serde(default)]
    pub session_epoch: u32,
    /// The WorkOS user who signs in to this account, if any.
    #[serde(default)]
    pub workos_user_id: Option<String>,
    /// Whether the email was verified (by WorkOS).
    #[serde(default)]
    pub email_verified: bool,
    /// Erased at its owner's request: no longer registered, nothing personal kept.
    #[serde(default)]
    pub erased: bool,
}

impl User {
    /// Until when `client` may not sign in, if it may not now: a lock of its own, or an
    /// account-wide lock recorded before locks were per client.
    pub fn is_locked(&self, client: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let own = self.client_locks.get(client).copied();
        [self.locked_until, own]
            .into_iter()
            .flatten()
            .filter(|until| *until > now)
            .max()
    }

    /// Forgets failures and locks that are over by `now`.
    fn forget_before(&mut self, now: DateTime<Utc>) {
        let memory = Duration::minutes(LOCKOUT_MINUTES);
        self.client_failures
            .retain(|_, (_, last)| now - *last < memory);
        self.client_locks.retain(|_, until| *until > now);
    }

    /// Whether the account has a password to sign in with.
    pub fn has_password(&self) -> bool {
        !self.password_hash.is_empty()
    }

    /// Checks that WorkOS user `id` may be linked to (or sign in to) this account.
    fn check_workos(&self, id: &str) -> Result<(), UserError> {
        if !self.registered {
            return Err(UserError::NotFound);
        }
        match &self.workos_user_id {
            Some(linked) if linked != id => Err(UserError::OtherWorkosUser),
            _ => Ok(()),
        }
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
    type Services = ();

    async fn handle(
        &mut self,
        command: UserCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), UserError> {
        match command {
            UserCommand::Register {
                name,
                email,
                phone,
                password_hash,
            } => {
                if self.registered {
                    return Err(UserError::AlreadyRegistered);
                }
                let event = UserEvent::UserRegistered {
                    name,
                    email,
                    phone,
                    password_hash,
                };
                sink.write(event, self).await;
            }
            UserCommand::UpdateProfile { name, email, phone } => {
                if !self.registered {
                    return Err(UserError::NotFound);
                }
                let name = name.filter(|n| *n != self.name);
                let email = email.filter(|e| Some(e) != self.email.as_ref());
                let phone = phone.filter(|p| Some(p) != self.phone.as_ref());
                if name.is_some() || email.is_some() || phone.is_some() {
                    sink.write(UserEvent::ProfileUpdated { name, email, phone }, self)
                        .await;
                }
            }
            UserCommand::RecordSignIn {
                succeeded,
                at,
                client,
            } => {
                if !self.registered {
                    return Err(UserError::NotFound);
                }
                if let Some(until) = self.is_locked(&client, at) {
                    return Err(UserError::Locked { until });
                }
                let client = Some(client);
                if succeeded {
                    sink.write(UserEvent::SignedIn { at, client }, self).await;
                } else {
                    let memory = Duration::minutes(LOCKOUT_MINUTES);
                    let before = client
                        .as_ref()
                        .and_then(|c| self.client_failures.get(c))
                        .filter(|(_, last)| at - *last < memory)
                        .map_or(0, |(n, _)| *n);
                    let consecutive = before + 1;
                    let failed = UserEvent::SignInFailed {
                        at,
                        consecutive,
                        client: client.clone(),
                    };
                    sink.write(failed, self).await;
                    if consecutive >= LOCKOUT_THRESHOLD {
                        let until = at + memory;
                        sink.write(UserEvent::AccountLocked { until, client }, self)
                            .await;
                    }
                }
            }
            UserCommand::RevokeToken {
                token_id,
                expires_at,
            } => {
                if !self.registered {
                    return Err(UserError::NotFound);
                }
                sink.write(
                    UserEvent::TokenRevoked {
                        token_id,
                        expires_at,
                    },
                    self,
                )
                .await;
            }
            UserCommand::ChangePassword {
                password_hash,
                at,
                reset,
            } => {
                if !self.registered {
                    return Err(UserError::NotFound);
                }
                sink.write(
                    UserEvent::PasswordChanged {
                        password_hash,
                        at,
                        reset,
                    },
                    self,
                )
                .await;
                let epoch = self.session_epoch + 1;
                sink.write(UserEvent::SessionsRevoked { epoch, at }, self)
                    .await;
            }
            UserCommand::RevokeAllSessions { at } => {
                if !self.registered {
                    return Err(UserError::NotFound);
                }
                let epoch = self.session_epoch + 1;
                sink.write(UserEvent::SessionsRevoked { epoch, at }, self)
                    .await;
            }
            UserCommand::RegisterWithWorkos {
                name,
                email,
                workos_user_id,
                email_verified,
            } => {
                if self.registered {
                    return Err(UserError::AlreadyRegistered);
                }
                let event = UserEvent::UserRegisteredWithWorkos {
                    name,
                    email,
                    workos_user_id,
                    email_verified,
                };
                sink.write(event, self).await;
            }
            UserCommand::LinkWorkos {
                workos_user_id,
                email_verified,
            } => {
                self.check_workos(&workos_user_id)?;
                if self.workos_user_id.is_none() {
                    let event = UserEvent::WorkosLinked {
                        workos_user_id,
                        email_verified,
                    };
                    sink.write(event, self).await;
                }
            }
            UserCommand::Erase { at } => {
                if !self.registered {
                    return Err(UserError::NotFound);
                }
                let epoch = self.session_epoch + 1;
                sink.write(UserEvent::SessionsRevoked { epoch, at }, self)
                    .await;
                sink.write(UserEvent::UserErased { at }, self).await;
            }
            UserCommand::RecordWorkosSignIn {
                workos_user_id,
                organization_id,
                method,
                at,
            } => {
                self.check_workos(&workos_user_id)?;
                if self.workos_user_id.is_none() {
                    return Err(UserError::NotFound);
                }
                let event = UserEvent::SignedInWithWorkos {
                    at,
                    organization_id,
                    method,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: UserEvent) {
        match event {
            UserEvent::UserRegistered {
                name,
                email,
                phone,
                password_hash,
            } => {
                self.registered = true;
                self.name = name;
                self.email = Some(email);
                self.phone = Some(phone);
                self.password_hash = password_hash;
            }
            UserEvent::ProfileUpdated { name, email, phone } => {
                if let Some(name) = name {
                    self.name = name;
                }
                if email.is_some() {
                    self.email = email;
                }
                if phone.is_some() {
                    self.phone = phone;
                }
            }
            UserEvent::SignInFailed {
                consecutive,
                at,
                client,
            } => {
                self.forget_before(at);
                match client {
                    Some(c) => {
                        self.client_failures.insert(c, (consecutive, at));
                    }
                    None => self.failed_sign_ins = consecutive,
                }
            }
            UserEvent::AccountLocked { until, client } => match client {
                Some(c) => {
                    self.client_failures.remove(&c);
                    self.client_locks.insert(c, until);
                }
                None => {
                    self.locked_until = Some(until);
                    self.failed_sign_ins = 0;
                }
            },
            UserEvent::SignedIn { at, client } => {
                self.forget_before(at);
                match client {
                    Some(c) => {
                        self.client_failures.remove(&c);
                    }
                    None => self.failed_sign_ins = 0,
                }
            }
            UserEvent::TokenRevoked { .. } => {}
            UserEvent::PasswordChanged { password_hash, .. } => {
                self.password_hash = password_hash;
                self.failed_sign_ins = 0;
                self.locked_until = None;
                self.client_failures.clear();
                self.client_locks.clear();
            }
            UserEvent::SessionsRevoked { epoch, .. } => self.session_epoch = epoch,
            UserEvent::UserRegisteredWithWorkos {
                name,
                email,
                workos_user_id,
                email_verified,
            } => {
                self.registered = true;
                self.name = name;
                self.email = Some(email);
                self.workos_user_id = Some(workos_user_id);
                self.email_verified = email_verified;
            }
            UserEvent::WorkosLinked {
                workos_user_id,
                email_verified,
            } => {
                self.workos_user_id = Some(workos_user_id);
                self.email_verified |= email_verified;
            }
            UserEvent::SignedInWithWorkos { .. } => {}
            UserEvent::UserErased { .. } => {
                *self = User {
                    erased: true,
                    session_epoch: self.session_epoch,
                    ..User::default()
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn registered() -> UserEvent {
        UserEvent::UserRegistered {
            name: "Jo".into(),
            email: Email::parse("jo@example.com").unwrap(),
            phone: PhoneNumber::parse("phone", "+14155550123").unwrap(),
            password_hash: "$argon2id$...".into(),
        }
    }

    fn failed(at: DateTime<Utc>, consecutive: u32, client: &str) -> UserEvent {
        UserEvent::SignInFailed {
            at,
            consecutive,
            client: Some(client.into()),
        }
    }

    fn attempt(succeeded: bool, at: DateTime<Utc>, client: &str) -> UserCommand {
        UserCommand::RecordSignIn {
            succeeded,
            at,
            client: client.into(),
        }
    }

    #[test]
    fn the_tenth_failure_from_a_client_locks_the_account_for_that_client_only() {
        let at = Utc::now();
        let mut given = vec![registered()];
        for i in 1..10 {
            given.push(failed(at, i, "stranger"));
        }
        let locked = UserEvent::AccountLocked {
            until: at + Duration::minutes(30),
            client: Some("stranger".into()),
        };
        TestFramework::<User>::with(())
            .given(given.clone())
            .when(attempt(false, at, "stranger"))
            .then_expect_events(vec![failed(at, 10, "stranger"), locked.clone()]);
        given.push(failed(at, 10, "stranger"));
        given.push(locked);
        // The stranger, even with the right password, until the lock ends.
        TestFramework::<User>::with(())
            .given(given.clone())
            .when(attempt(true, at + Duration::minutes(29), "stranger"))
            .then_expect_error(UserError::Locked {
                until: at + Duration::minutes(30),
            });
        TestFramework::<User>::with(())
            .given(given.clone())
            .when(attempt(true, at + Duration::minutes(31), "stranger"))
            .then_expect_events(vec![UserEvent::SignedIn {
                at: at + Duration::minutes(31),
                client: Some("stranger".into()),
            }]);
        // The owner, from an address that has not failed, meanwhile: signed in; and a failure
        // of theirs starts their own count.
        TestFramework::<User>::with(())
            .given(given.clone())
            .when(attempt(true, at + Duration::minutes(1), "owner"))
            .then_expect_events(vec![UserEvent::SignedIn {
                at: at + Duration::minutes(1),
                client: Some("owner".into()),
            }]);
        TestFramework::<User>::with(())
            .given(given)
            .when(attempt(false, at + Duration::minutes(1), "owner"))
            .then_expect_events(vec![failed(at + Duration::minutes(1), 1, "owner")]);
    }

    #[test]
    fn a_success_resets_the_clients_count_and_old_failures_are_forgotten() {
        let at = Utc::now();
        TestFramework::<User>::with(())
            .given(vec![
                registered(),
                failed(at, 9, "a"),
                UserEvent::SignedIn {
                    at,
                    client: Some("a".into()),
                },
            ])
            .when(attempt(false, at, "a"))
            .then_expect_events(vec![failed(at, 1, "a")]);
        // Another client's success does not reset a's count.
        TestFramework::<User>::with(())
            .given(vec![
                registered(),
                failed(at, 9, "a"),
                UserEvent::SignedIn {
                    at,
                    client: Some("b".into()),
                },
            ])
            .when(attempt(false, at, "a"))
            .then_expect_events(vec![
                failed(at, 10, "a"),
                UserEvent::AccountLocked {
                    until: at + Duration::minutes(30),
                    client: Some("a".into()),
                },
            ]);
        // Nine failures more than 30 minutes ago: forgotten.
        let later = at + Duration::minutes(31);
        TestFramework::<User>::with(())
            .given(vec![registered(), failed(at, 9, "a")])
            .when(attempt(false, later, "a"))
            .then_expect_events(vec![failed(later, 1, "a")]);
        let mut user = User::default();
        for e in [registered(), failed(at, 3, "a"), failed(later, 1, "b")] {
            user.apply(e);
        }
        assert_eq!(user.client_failures.len(), 1, "a's old failures forgotten");
    }

    #[test]
    fn an_account_wide_lock_recorded_before_clients_still_holds() {
        let at = Utc::now();
        TestFramework::<User>::with(())
            .given(vec![
                registered(),
                UserEvent::AccountLocked {
                    until: at + Duration::minutes(30),
                    client: None,
                },
            ])
            .when(attempt(true, at, "anyone"))
            .then_expect_error(UserError::Locked {
                until: at + Duration::minutes(30),
            });
    }

    #[test]
    fn a_new_password_revokes_every_session_and_unlocks() {
        let at = Utc::now();
        let mut user = User::default();
        for e in [
            registered(),
            UserEvent::SessionsRevoked { epoch: 1, at },
            UserEvent::AccountLocked {
                until: at + Duration::minutes(30),
                client: None,
            },
            failed(at, 3, "a"),
        ] {
            user.apply(e);
        }
        TestFramework::<User>::with(())
            .given(vec![
                registered(),
                UserEvent::SessionsRevoked { epoch: 1, at },
                UserEvent::AccountLocked {
                    until: at + Duration::minutes(30),
                    client: None,
                },
            ])
            .when(UserCommand::ChangePassword {
                password_hash: "$argon2id$new".into(),
                at,
                reset: true,
            })
            .then_expect_events(vec![
                UserEvent::PasswordChanged {
                    password_hash: "$argon2id$new".into(),
                    at,
                    reset: true,
                },
                UserEvent::SessionsRevoked { epoch: 2, at },
            ]);
        user.apply(UserEvent::PasswordChanged {
            password_hash: "$argon2id$new".into(),
            at,
            reset: true,
        });
        assert_eq!(user.is_locked("a", at), None);
        assert!(user.client_failures.is_empty());
        assert_eq!(user.password_hash, "$argon2id$new");
    }

    #[test]
    fn signing_out_everywhere_moves_to_the_next_epoch() {
        let at = Utc::now();
        TestFramework::<User>::with(())
            .given(vec![registered()])
            .when(UserCommand::RevokeAllSessions { at })
            .then_expect_events(vec![UserEvent::SessionsRevoked { epoch: 1, at }]);
        TestFramework::<User>::with(())
            .given_no_previous_events()
            .when(UserCommand::RevokeAllSessions { at })
            .then_expect_error(UserError::NotFound);
    }

    #[test]
    fn a_workos_user_links_once_and_signs_in_only_to_its_account() {
        let at = Utc::now();
        let linked = UserEvent::WorkosLinked {
            workos_user_id: "user_01A".into(),
            email_verified: true,
        };
        TestFramework::<User>::with(())
            .given(vec![registered()])
            .when(UserCommand::LinkWorkos {
                workos_user_id: "user_01A".into(),
                email_verified: true,
            })
            .then_expect_events(vec![linked.clone()]);
        TestFramework::<User>::with(())
            .given(vec![registered(), linked.clone()])
            .when(UserCommand::LinkWorkos {
                workos_user_id: "user_01A".into(),
                email_verified: true,
            })
            .then_expect_events(vec![]);
        TestFramework::<User>::with(())
            .given(vec![registered(), linked.clone()])
            .when(UserCommand::LinkWorkos {
                workos_user_id: "user_01B".into(),
                email_verified: true,
            })
            .then_expect_error(UserError::OtherWorkosUser);
        TestFramework::<User>::with(())
            .given(vec![registered()])
            .when(UserCommand::RecordWorkosSignIn {
                workos_user_id: "user_01A".into(),
                organization_id: None,
                method: "Password".into(),
                at,
            })
            .then_expect_error(UserError::NotFound);
        TestFramework::<User>::with(())
            .given(vec![registered(), linked])
            .when(UserCommand::RecordWorkosSignIn {
                workos_user_id: "user_01A".into(),
                organization_id: Some("org_1".into()),
                method: "SSO".into(),
                at,
            })
            .then_expect_events(vec![UserEvent::SignedInWithWorkos {
                at,
                organization_id: Some("org_1".into()),
                method: "SSO".into(),
            }]);
    }

    #[test]
    fn an_erased_account_ends_its_sessions_and_keeps_nothing_personal() {
        let at = Utc::now();
        TestFramework::<User>::with(())
            .given(vec![registered()])
            .when(UserCommand::Erase { at })
            .then_expect_events(vec![
                UserEvent::SessionsRevoked { epoch: 1, at },
                UserEvent::UserErased { at },
            ]);
        TestFramework::<User>::with(())
            .given(vec![registered(), UserEvent::UserErased { at }])
            .when(UserCommand::RecordSignIn {
                succeeded: true,
                at,
                client: "c1".into(),
            })
            .then_expect_error(UserError::NotFound);
        let mut user = User::default();
        for e in [
            registered(),
            UserEvent::SessionsRevoked { epoch: 1, at },
            UserEvent::UserErased { at },
        ] {
            user.apply(e);
        }
        assert!(user.erased && !user.registered && user.email.is_none() && !user.has_password());
        assert_eq!(user.session_epoch, 1);
    }

    #[test]
    fn a_workos_registration_has_no_password() {
        let mut user = User::default();
        user.apply(UserEvent::UserRegisteredWithWorkos {
            name: "Jo".into(),
            email: Email::parse("jo@example.com").unwrap(),
            workos_user_id: "user_01A".into(),
            email_verified: true,
        });
        assert!(user.registered && !user.has_password() && user.phone.is_none());
        assert_eq!(user.workos_user_id.as_deref(), Some("user_01A"));
    }

    #[test]
    fn unchanged_profile_fields_record_nothing() {
        TestFramework::<User>::with(())
            .given(vec![registered()])
            .when(UserCommand::UpdateProfile {
                name: Some("Jo".into()),
                email: Some(Email::parse("JO@example.com").unwrap()),
                phone: None,
            })
            .then_expect_events(vec![]);
    }
}
