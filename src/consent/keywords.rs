//! Consent keywords: recognising STOP/START/YES/NO replies across the EU/EEA, UK and Swiss markets.
//!
//! A keyword only counts when it is the whole message: "stop" opts out, "please stop sending"
//! does not. Free text is ambiguous ("don't stop the offers!"), so longer messages are left to a
//! human instead of guessed at. Lists are deliberately conservative; operators add more.

use std::collections::HashSet;

use unicode_normalization::{UnicodeNormalization, char::is_combining_mark};

/// Text as keywords are compared: Unicode NFKD, combining marks removed (accents ignored),
/// lowercased, surrounding white space and surrounding punctuation (.,!?¡¿ quotes etc) removed,
/// inner runs of white space collapsed to one space.
pub fn normalize(s: &str) -> String {
    // NFKD before lowercasing: compatibility forms ("ＳＴＯＰ", "㎒") decompose to capitals.
    let folded: String = s
        .nfkd()
        .filter(|&c| !is_combining_mark(c) && !is_invisible(c))
        .collect::<String>()
        .to_lowercase();
    folded
        .trim_matches(|c: char| c.is_whitespace() || is_edge_punct(c))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Zero-width characters keyboards and copy-paste insert: the customer sees "STOP", so must we.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}')
}

/// Quotes and marks NFKD keeps; ASCII punctuation (which also covers WhatsApp's *bold* and
/// _italic_ markers) is checked separately.
const EDGE_PUNCT: &str = "¡¿«»‹›‘’‚‛“”„‟·•–—。、";

fn is_edge_punct(c: char) -> bool {
    c.is_ascii_punctuation() || EDGE_PUNCT.contains(c)
}

/// A set of keywords, stored normalized.
#[derive(Clone, Debug, Default)]
pub struct Keywords {
    set: HashSet<String>,
}

impl Keywords {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(words: I) -> Self {
        // A keyword that normalizes to "" (e.g. "!!") would match every message made only of
        // spaces or punctuation, so it is dropped rather than stored.
        let set = words
            .into_iter()
            .map(|w| normalize(w.as_ref()))
            .filter(|w| !w.is_empty())
            .collect();
        Self { set }
    }

    /// Whether the whole message (normalized) is one of the keywords. Never matches a keyword
    /// inside a longer sentence.
    pub fn matches(&self, text: &str) -> bool {
        self.set.contains(&normalize(text))
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }
}

/// Default opt-out keywords: STOP in the languages of the EU/EEA markets and the UK, Switzerland.
///
/// Left out on purpose, because they are ordinary replies to a business and would silently drop
/// consent the customer never meant to withdraw (operators can add them in configuration):
/// * "no", "nein", "non" ... — answers to any question; they live in [`DEFAULT_NO`].
/// * "cancel" and its translations (ANNULLA, CANCELLA, CANCELAR, ANNULER, STORNO) — the natural
///   reply to an order or appointment message ("cancel my booking"), not to marketing consent.
/// * ALTO (es) — not the Spanish opt-out convention (that is BAJA), means "high" as an answer to
///   rating questions, and is one letter away from the opt-in ALTA.
/// * END, QUIT, BASTA, PERU (fi "cancel") — too often a chat or bot-menu reply.
#[rustfmt::skip]
pub const DEFAULT_OPT_OUT: &[&str] = &[
    "STOP", "STOPALL", "UNSUBSCRIBE", "OPTOUT", "OPT-OUT", "OPT OUT", // en (UK, IE, MT)
    "STOPP", "STOPPEN", "STAD",                     // de/sv/no/is, de/nl, ga
    "ABMELDEN", "ABBESTELLEN",                      // de (DE, AT, CH, LU, LI)
    "ARRÊT", "ARRET", "DÉSINSCRIRE", "DÉSABONNER",  // fr (FR, BE, CH, LU)
    "DISISCRIVI", "DISISCRIVIMI", "CANCELLAMI",     // it: "cancellami" = "remove me", not "cancel"
    "BAJA", "DARSE DE BAJA", "PARAR", "SAIR",       // es, es, es/pt, pt
    "AFMELDEN", "UITSCHRIJVEN",                     // nl (NL, BE)
    "AVSLUTA", "AVANMÄL", "AFMELD", "OPSIG",        // sv, sv, da, da
    "AVSLUTT", "AVMELD",                            // no
    "LOPETA", "LÕPETA",                             // fi, et (both normalize to "lopeta")
    "WYPISZ", "ODHLÁSIT", "ODHLÁSIŤ",               // pl, cs, sk
    "LEIRATKOZÁS", "DEZABONARE",                    // hu, ro
    "ΔΙΑΚΟΠΗ", "ΣΤΟΠ", "ΑΠΕΓΓΡΑΦΗ",                 // el (GR, CY)
    "СТОП", "ОТПИСВАНЕ",                            // bg
    "ODJAVA", "ATSISAKYTI",                         // hr/sl, lt
    "ATTEIKTIES", "ATRAKSTĪTIES", "IEQAF",          // lv, lv, mt
];

/// Default keywords that start a new opt-in (START and equivalents).
///
/// A keyword opt-in only starts the double opt-in question answered with [`DEFAULT_YES`]; even so
/// the list avoids words that also mean "go on" or "begin the chat" (JATKA, INICIAR, CONTINUE),
/// because a customer opening a support chat has not asked for marketing.
#[rustfmt::skip]
pub const DEFAULT_OPT_IN: &[&str] = &[
    "START", "UNSTOP", "SUBSCRIBE",             // en
    "ANMELDEN", "ABONNIEREN",                   // de
    "INSCRIRE", "ABONNER",                      // fr (ABONNER is da/no too)
    "ISCRIVI", "ISCRIVIMI",                     // it
    "ALTA", "DARSE DE ALTA", "SUBSCREVER",      // es, es, pt
    "AANMELDEN", "STARTA", "TILMELD", "PÅMELD", // nl, sv, da, no
    "ALOITA", "ALUSTA",                         // fi, et
    "ZAPISZ", "PŘIHLÁSIT", "PRIHLÁSIŤ",         // pl, cs, sk
    "FELIRATKOZÁS", "ABONARE",                  // hu, ro
    "ΕΓΓΡΑΦΗ", "АБОНИРАНЕ",                     // el, bg
    "PRIJAVA", "UŽSISAKYTI", "PIERAKSTĪTIES",   // hr/sl, lt, lv
];

/// Default "yes" replies to a double opt-in confirmation question.
///
/// Only the standard word per language: consent has to be unambiguous, so "ok", "👍" or slang are
/// not treated as a yes by default.
#[rustfmt::skip]
pub const DEFAULT_YES: &[&str] = &[
    "YES", "JA", "OUI",           // en; de, nl, sv, da, no; fr
    "SÍ", "SI", "SIM",            // es/it, es/it, pt
    "KYLLÄ", "JAH", "TAK",        // fi, et, pl
    "ANO", "ÁNO", "IGEN",         // cs, sk, hu
    "DA", "ΝΑΙ", "ДА",            // ro/hr/sl, el, bg
    "TAIP", "JĀ", "IVA",          // lt, lv, mt
];

/// Default "no" replies.
#[rustfmt::skip]
pub const DEFAULT_NO: &[&str] = &[
    "NO", "NEIN", "NON", "NÃO",   // en/es/it, de, fr, pt
    "NEE", "NEJ", "NEI",          // nl, sv/da, no
    "EI", "NIE", "NE", "NEM",     // fi/et, pl, cs/sk/hr/sl/lt, hu
    "NU", "ΟΧΙ", "НЕ",            // ro, el, bg
    "NĒ", "LE",                   // lv, mt
];

/// Label of the marketing opt-out quick-reply button that WhatsApp Manager's template builder
/// offers for marketing templates; match it against both `button.payload` and `button.text`.
///
/// Meta documents only the shape of a template quick-reply tap, an inbound `"type":"button"`
/// message with `"button":{"payload":..,"text":..}`
/// (<https://developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/reference/messages/button/>),
/// not the values this button sends. "Stop promotions" is third-party knowledge: Braze has
/// customers trigger on the text "STOP PROMOTIONS"
/// (<https://github.com/braze-inc/braze-docs/pull/4758>), and
/// shared/reference/cloud-api-facts.md §6.2 cites YCloud that a tap is only a reply the business
/// must act on. Captured payloads of plain quick replies repeat the label, hence one list for
/// both fields. Labels of non-English templates are undocumented: add your own.
/// Meta's Stop/Resume control in the client is separate: a `user_preferences` webhook.
pub const META_OPT_OUT_BUTTON_PAYLOADS: &[&str] = &["Stop promotions"];

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(list: &[&str]) -> HashSet<String> {
        list.iter().map(|w| normalize(w)).collect()
    }

    #[test]
    fn whole_message_variants_match() {
        let out = Keywords::new(DEFAULT_OPT_OUT);
        let texts = [
            "  stop  ",
            "Stop!",
            "STOP.",
            "*STOP*",
            "«Stop»",
            "stop\u{200B}",
            "ＳＴＯＰ",
        ];
        let more = [
            "LÖPETA",
            "lopeta",
            "Lõpeta",
            "Arrêt",
            "arret !",
            "¡Baja!",
            "Διακοπή",
            "стоп",
        ];
        for text in texts.iter().chain(&more).chain(&["opt   out"]) {
            assert!(out.matches(text), "{text:?}");
        }
        assert!(Keywords::new(["LOPETA"]).matches("LÖPETA"));
    }

    #[test]
    fn keyword_inside_a_sentence_does_not_match() {
        let out = Keywords::new(DEFAULT_OPT_OUT);
        let texts = [
            "please stop sending",
            "stop it",
            "don't stop",
            "s t o p",
            "stopp mal",
            "",
            " ",
        ];
        for text in texts {
            assert!(!out.matches(text), "{text:?}");
        }
        assert!(!Keywords::new(DEFAULT_YES).matches("yes please"));
    }

    #[test]
    fn normalize_examples() {
        assert_eq!(normalize("  ¿Darse   de\tBAJA?  "), "darse de baja");
        assert_eq!(normalize("opt-out"), "opt-out");
        assert_eq!(normalize("ΝΑΙ"), normalize("ναί"));
        assert_eq!(normalize("!!"), "");
        assert!(Keywords::new(["!!", " "]).is_empty());
    }

    #[test]
    fn normalization_is_idempotent() {
        let samples = [
            "  Ärger!! ",
            "ﬁn",
            "㎒",
            "İSTANBUL",
            "ΣΟΦΟΣ",
            "x\u{0301}",
            "\u{FEFF}ok",
        ];
        for s in samples.iter().chain(DEFAULT_OPT_OUT) {
            let once = normalize(s);
            assert_eq!(normalize(&once), once, "{s:?}");
        }
        // Every code point, at the edge and inside a word, so no odd case mapping slips through.
        for c in (0..0x3_0000).filter_map(char::from_u32) {
            let once = normalize(&format!("a{c}b {c}"));
            assert_eq!(normalize(&once), once, "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn every_default_matches_itself() {
        let lists = [DEFAULT_OPT_OUT, DEFAULT_OPT_IN, DEFAULT_YES, DEFAULT_NO];
        for list in lists.into_iter().chain([META_OPT_OUT_BUTTON_PAYLOADS]) {
            let kw = Keywords::new(list);
            for w in list {
                assert!(!normalize(w).is_empty(), "{w:?}");
                assert!(kw.matches(w) && kw.matches(&w.to_lowercase()), "{w:?}");
            }
        }
    }

    #[test]
    fn opposite_lists_are_disjoint() {
        let (out, inn) = (normalized(DEFAULT_OPT_OUT), normalized(DEFAULT_OPT_IN));
        assert_eq!(out.intersection(&inn).count(), 0, "{out:?} / {inn:?}");
        // Config refuses an opt-in or YES word that is also an opt-out word, defaults included.
        assert!(out.is_disjoint(&normalized(DEFAULT_YES)));
        assert!(normalized(META_OPT_OUT_BUTTON_PAYLOADS).is_disjoint(&inn));
        let (yes, no) = (normalized(DEFAULT_YES), normalized(DEFAULT_NO));
        assert_eq!(yes.intersection(&no).count(), 0, "{yes:?} / {no:?}");
    }

    #[test]
    fn len_counts_collapsed_duplicates() {
        let kw = Keywords::new(["ARRÊT", "ARRET", "arret!"]);
        assert_eq!(kw.len(), 1);
        assert!(!kw.is_empty());
    }
}
