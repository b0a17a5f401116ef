//! GDPR tools over the consent store: `sendwell consent show | export | import | erase`.
