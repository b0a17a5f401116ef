//! What a WhatsApp message costs: the `[prices]` rate card from the config, validated into a
//! table that answers "how much for this category to this recipient" in a few hash lookups.
//!
//! Meta charges per *delivered template message*, by template category × the recipient's
//! market (a country calling code, or a region of several codes), and changes the rates
//! quarterly. Meta does not put the amount in the webhook, only whether the message was
//! charged (`pricing.type`, see [`billed`]), so the daemon needs its own copy of the rate card
//! both to estimate at send time and to report the billed amount afterwards.
//!
//! Money is kept as integer micro-units ([`Micros`]) and parsed from decimal *strings*: rate
//! cards have four decimals, and a float would turn 1,000 × 0.1131 into 113.09999….

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

/// Pricing categories as Meta spells them in a status webhook's `pricing.category`.
/// The index of a category here is its slot in a market's price row.
const CATEGORIES: [&str; 7] = [
    "marketing",
    "utility",
    "authentication",
    "authentication-international",
    "service",
    "marketing_lite",
    "referral_conversion",
];

/// Price row of one market (or of the default): one optional price per category.
type Row = [Option<Micros>; CATEGORIES.len()];

/// Market label for recipients no listed market claims; Meta calls that market "Other".
const OTHER: &str = "other";

/// Longest calling code (ITU E.164 codes are 1–3 digits; 4 leaves room for the NANP
/// areas such as 1242 that Meta may price apart from "1").
const MAX_CODE_LEN: usize = 4;

/// Micro-units per currency unit: six decimals covers every rate card (they use four).
const MICROS_PER_UNIT: i64 = 1_000_000;

/// An amount of money in millionths of the table's currency (1 EUR = `Micros(1_000_000)`).
///
/// Integers, so sums are exact; i64 holds about 9.2 trillion currency units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Micros(pub i64);

impl Micros {
    /// Decimal text for people and outcome events: `"0.1131"`, `"0.10"`, `"1.00"`.
    ///
    /// Trailing zeros are trimmed (rate cards have four decimals, not six) but two fraction
    /// digits stay, because that is how amounts of money are conventionally written.
    pub fn to_decimal_string(self) -> String {
        let sign = if self.0 < 0 { "-" } else { "" };
        let v = self.0.unsigned_abs();
        let unit = MICROS_PER_UNIT.unsigned_abs();
        let mut frac = format!("{:06}", v % unit);
        while frac.len() > 2 && frac.ends_with('0') {
            frac.pop();
        }
        format!("{sign}{}.{frac}", v / unit)
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_decimal_string())
    }
}

impl Add for Micros {
    type Output = Micros;
    fn add(self, rhs: Micros) -> Micros {
        Micros(self.0 + rhs.0)
    }
}

impl AddAssign for Micros {
    fn add_assign(&mut self, rhs: Micros) {
        self.0 += rhs.0;
    }
}

impl Sum for Micros {
    fn sum<I: Iterator<Item = Micros>>(iter: I) -> Micros {
        iter.fold(Micros(0), Add::add)
    }
}

impl<'a> Sum<&'a Micros> for Micros {
    fn sum<I: Iterator<Item = &'a Micros>>(iter: I) -> Micros {
        iter.copied().sum()
    }
}

/// The `[prices]` config section as written.
///
/// Prices are strings (`marketing = "0.1131"`): a TOML float would already have lost
/// exactness before we saw it, so a bare number is refused at deserialization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricesFile {
    /// ISO 4217 code of every price in the file, e.g. `"EUR"`.
    pub currency: String,
    /// Date of the rate card, e.g. `"2026-10-01"`; informational only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective: Option<String>,
    /// Where the figures come from; informational only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Category → decimal price string for recipients in no listed market (Meta's "Other"),
    /// and for categories a listed market leaves out.
    #[serde(default)]
    pub default: BTreeMap<String, String>,
    /// Market name → its calling codes and prices.
    #[serde(default)]
    pub markets: BTreeMap<String, MarketFile>,
}

/// One market of the `[prices.markets.<name>]` table.
///
/// No `deny_unknown_fields` here: serde cannot combine it with `flatten`. A misspelt key lands
/// in `prices` instead and [`PricesFile::validate`] reports it as an unknown category.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MarketFile {
    /// Country calling codes of the market, digits only: `["49"]`, `["43", "32", "358"]`.
    /// Defaulted so a missing list is reported by `validate` under a config key, not by serde.
    #[serde(default)]
    pub calling_codes: Vec<String>,
    /// Category → decimal price string.
    #[serde(flatten)]
    pub prices: BTreeMap<String, String>,
}

impl Default for PricesFile {
    /// EUR with empty tables: every price is unknown, so nothing gets a cost until the
    /// operator supplies a rate card (a wrong built-in card would be worse than none).
    fn default() -> Self {
        PricesFile {
            currency: "EUR".to_string(),
            effective: None,
            source: None,
            default: BTreeMap::new(),
            markets: BTreeMap::new(),
        }
    }
}

impl PricesFile {
    /// Checks the whole section and builds the lookup table.
    ///
    /// Every problem is returned, as `(config key, reason)` with keys like
    /// `prices.markets.germany.marketing`, so the operator can fix the file in one go.
    pub fn validate(self) -> Result<PriceTable, Vec<(String, String)>> {
        let mut problems = Vec::new();

        if !(self.currency.len() == 3 && self.currency.bytes().all(|b| b.is_ascii_uppercase())) {
            problems.push((
                "prices.currency".to_string(),
                format!(
                    "{:?} is not an ISO 4217 currency code (three capital letters, e.g. \"EUR\")",
                    self.currency
                ),
            ));
        }

        let default = parse_row("prices.default", &self.default, &mut problems);

        let mut markets: Vec<Market> = Vec::with_capacity(self.markets.len());
        let mut by_code: HashMap<String, usize> = HashMap::new();
        for (name, file) in self.markets {
            let key = format!("prices.markets.{name}");
            let codes_key = format!("{key}.calling_codes");
            // "other" already labels the default in metrics; a market of that name would merge
            // two different price sources into one series.
            if name.is_empty() || name == OTHER {
                problems.push((
                    key.clone(),
                    format!("{name:?} cannot name a market (\"other\" labels the default prices)"),
                ));
            }
            if file.calling_codes.is_empty() {
                problems.push((
                    codes_key.clone(),
                    "list at least one calling code, e.g. [\"49\"]".to_string(),
                ));
            }
            let index = markets.len();
            for code in &file.calling_codes {
                if !is_calling_code(code) {
                    problems.push((
                        codes_key.clone(),
                        format!(
                            "{code:?} is not a calling code (1 to 4 digits, not starting with 0)"
                        ),
                    ));
                    continue;
                }
                // A code in two markets would make the price depend on map order; refuse it.
                if let Some(&other) = by_code.get(code.as_str()) {
                    let owner = markets
                        .get(other)
                        .map_or(name.as_str(), |m| m.name.as_str());
                    problems.push((
                        codes_key.clone(),
                        if other == index {
                            format!("calling code {code:?} is listed twice")
                        } else {
                            format!("calling code {code:?} is already listed by market {owner:?}")
                        },
                    ));
                    continue;
                }
                by_code.insert(code.clone(), index);
            }
            let prices = parse_row(&key, &file.prices, &mut problems);
            markets.push(Market { name, prices });
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(PriceTable {
            currency: self.currency,
            effective: self.effective,
            source: self.source,
            default,
            markets,
            by_code,
        })
    }
}

/// The price table in use, replaceable while the daemon runs (SIGHUP): readers take the
/// current table; a reload swaps it for the next reads.
#[derive(Debug)]
pub struct SharedPrices(std::sync::RwLock<std::sync::Arc<PriceTable>>);

impl SharedPrices {
    pub fn new(table: std::sync::Arc<PriceTable>) -> Self {
        Self(std::sync::RwLock::new(table))
    }

    pub fn get(&self) -> std::sync::Arc<PriceTable> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, table: std::sync::Arc<PriceTable>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = table;
    }
}

/// Validated rate card with a calling-code index; cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct PriceTable {
    currency: String,
    effective: Option<String>,
    source: Option<String>,
    default: Row,
    markets: Vec<Market>,
    /// Calling code → index into `markets`, so a lookup is at most four hash probes.
    by_code: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
struct Market {
    name: String,
    prices: Row,
}

impl Default for PriceTable {
    /// The table of [`PricesFile::default`]: EUR, every price unknown.
    fn default() -> Self {
        PriceTable {
            currency: "EUR".to_string(),
            effective: None,
            source: None,
            default: [None; CATEGORIES.len()],
            markets: Vec::new(),
            by_code: HashMap::new(),
        }
    }
}

impl PriceTable {
    /// ISO 4217 code of every price in the table.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The rate card date from the file, if given.
    pub fn effective(&self) -> Option<&str> {
        self.effective.as_deref()
    }

    /// Where the figures come from, if given.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// Price of one message of `category` to a recipient given as E.164 digits (a leading
    /// `+` is tolerated).
    ///
    /// The market is the one with the longest matching calling-code prefix ("1242" beats
    /// "1"). A category the market does not list falls back to the default prices, so a card
    /// can give e.g. `authentication-international` once for everyone. `None` when neither
    /// has the category, or the category is unknown: the caller reports "cost unknown"
    /// rather than a made-up zero.
    pub fn price(&self, category: &str, recipient_digits: &str) -> Option<Micros> {
        let c = category_index(category)?;
        match self.market_index(recipient_digits) {
            Some(m) => self.markets[m].prices[c].or(self.default[c]),
            None => self.default[c],
        }
    }

    /// The `[prices]` section that validates to this table (for `check-config`): prices as
    /// decimal strings, each market's calling codes in ascending order.
    pub fn to_file(&self) -> PricesFile {
        let row = |r: &Row| -> BTreeMap<String, String> {
            CATEGORIES
                .iter()
                .zip(r)
                .filter_map(|(c, p)| Some((c.to_string(), p.as_ref()?.to_decimal_string())))
                .collect()
        };
        let mut markets: BTreeMap<String, MarketFile> = self
            .markets
            .iter()
            .map(|m| {
                let file = MarketFile {
                    calling_codes: Vec::new(),
                    prices: row(&m.prices),
                };
                (m.name.clone(), file)
            })
            .collect();
        let mut codes: Vec<(&String, usize)> = self.by_code.iter().map(|(c, i)| (c, *i)).collect();
        codes.sort();
        for (code, i) in codes {
            if let Some(m) = markets.get_mut(&self.markets[i].name) {
                m.calling_codes.push(code.clone());
            }
        }
        PricesFile {
            currency: self.currency.clone(),
            effective: self.effective.clone(),
            source: self.source.clone(),
            default: row(&self.default),
            markets,
        }
    }

    /// Name of the market a recipient falls in (`"germany"`), or `"other"` for the default;
    /// meant for metric labels, so the set of values is bounded by the config.
    pub fn market(&self, recipient_digits: &str) -> &str {
        self.market_index(recipient_digits)
            .map_or(OTHER, |m| self.markets[m].name.as_str())
    }

    fn market_index(&self, recipient_digits: &str) -> Option<usize> {
        let digits = recipient_digits
            .strip_prefix('+')
            .unwrap_or(recipient_digits);
        // Longest prefix first, so a specific code wins over the region that contains it.
        // `get` (not slicing) because a malformed non-ASCII input must not panic.
        (1..=MAX_CODE_LEN.min(digits.len()))
            .rev()
            .find_map(|n| digits.get(..n).and_then(|p| self.by_code.get(p)).copied())
    }
}

/// What a status webhook's `pricing` object means for billing: was this message charged?
///
/// `type` decides when it is known ("regular" is charged; "free_customer_service" and
/// "free_entry_point" are not). `billable` is what Meta sent before `type` existed and says it
/// will deprecate, so it is only the fallback: for a missing type, or a type newer than this
/// code. Neither present means no `pricing` to go by, and we do not invent a charge.
pub fn billed(pricing_billable: Option<bool>, pricing_type: Option<&str>) -> bool {
    match pricing_type {
        Some("regular") => true,
        Some("free_customer_service" | "free_entry_point") => false,
        Some(_) | None => pricing_billable.unwrap_or(false),
    }
}

/// Slot of a category in a price row. Also accepts `authentication_international`, the
/// spelling of `conversation.origin.type`, so a category taken from there still prices.
fn category_index(category: &str) -> Option<usize> {
    category_slot(match category {
        "authentication_international" => "authentication-international",
        c => c,
    })
}

/// A pricing category as a metric label or log key: Meta's spelling when it is one of
/// [`CATEGORIES`] (either spelling of the international authentication), else `"other"`, so a
/// webhook cannot add label values of its own choosing.
pub fn category_label(category: &str) -> &'static str {
    category_index(category).map_or(OTHER, |i| CATEGORIES[i])
}

/// Slot of a category spelt exactly as in [`CATEGORIES`].
fn category_slot(category: &str) -> Option<usize> {
    CATEGORIES.iter().position(|&c| c == category)
}

/// Parses one `category -> price` table, recording problems under `key.<category>`.
fn parse_row(
    key: &str,
    table: &BTreeMap<String, String>,
    problems: &mut Vec<(String, String)>,
) -> Row {
    let mut row: Row = [None; CATEGORIES.len()];
    for (category, text) in table {
        let item_key = format!("{key}.{category}");
        // Exact spelling only (no alias), so each price has exactly one key in the file.
        let Some(slot) = category_slot(category) else {
            problems.push((
                item_key,
                format!(
                    "unknown pricing category {category:?}; expected one of {}",
                    CATEGORIES.join(", ")
                ),
            ));
            continue;
        };
        match parse_decimal(text) {
            Ok(m) => row[slot] = Some(m),
            Err(reason) => problems.push((item_key, reason)),
        }
    }
    row
}

/// Parses a non-negative decimal string with at most six fraction digits ("0.1131", "1",
/// "0") into micro-units, exactly. Signs, exponents, spaces and bare dots are refused so a
/// price means one thing only.
pub fn parse_decimal(text: &str) -> Result<Micros, String> {
    let bad = |why: &str| {
        Err(format!(
            "{text:?} is not a price: {why} (write a decimal string like \"0.1131\")"
        ))
    };
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (text, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return bad("only digits with an optional '.' and fraction are allowed");
    }
    let frac = frac.unwrap_or("");
    if frac.len() > 6 {
        return bad("more than 6 fraction digits");
    }
    // Digits only, checked above, so parse errors can only be overflow.
    let frac_micros = format!("{frac:0<6}").parse::<i64>().unwrap_or(0);
    let micros = int
        .parse::<i64>()
        .ok()
        .and_then(|i| i.checked_mul(MICROS_PER_UNIT))
        .and_then(|i| i.checked_add(frac_micros));
    match micros {
        Some(m) => Ok(Micros(m)),
        None => bad("too large"),
    }
}

/// 1–4 ASCII digits without a leading 0 (no calling code starts with 0; "049" is a typo).
fn is_calling_code(code: &str) -> bool {
    (1..=MAX_CODE_LEN).contains(&code.len())
        && code.bytes().all(|b| b.is_ascii_digit())
        && !code.starts_with('0')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The section as it sits in the config file, under `[prices]`.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wrapper {
        prices: PricesFile,
    }

    /// Deserializes the way the daemon does: figment parses the TOML and hands over the
    /// section (the main crate has no `toml` dependency of its own).
    fn parse(toml_text: &str) -> Result<Wrapper, String> {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(toml_text))
            .extract()
            .map_err(|e| e.to_string())
    }

    fn file(toml_text: &str) -> PricesFile {
        parse(toml_text).expect("test TOML deserializes").prices
    }

    fn table(toml_text: &str) -> PriceTable {
        file(toml_text).validate().expect("test prices are valid")
    }

    fn problems(toml_text: &str) -> Vec<(String, String)> {
        file(toml_text)
            .validate()
            .expect_err("test prices are invalid")
    }

    const SAMPLE: &str = r#"
        [prices]
        currency = "EUR"
        [prices.default]
        marketing = "0.05"
        authentication-international = "0.03"
        [prices.markets.north_america]
        calling_codes = ["1"]
        marketing = "0.0207"
        utility = "0.0028"
        [prices.markets.bahamas]
        calling_codes = ["1242"]
        marketing = "0.09"
        [prices.markets.germany]
        calling_codes = ["49"]
        marketing = "0.1131"
    "#;

    #[test]
    fn decimal_parsing() {
        assert_eq!(parse_decimal("0.1131"), Ok(Micros(113_100)));
        assert_eq!(parse_decimal("1"), Ok(Micros(1_000_000)));
        assert_eq!(parse_decimal("0"), Ok(Micros(0)));
        assert_eq!(parse_decimal("0.000001"), Ok(Micros(1)));
        assert_eq!(parse_decimal("12.5"), Ok(Micros(12_500_000)));
        for bad in [
            "0.0000001",
            "-1",
            "+1",
            "1e3",
            "0.1 ",
            " 0.1",
            "",
            ".5",
            "1.",
            "1.2.3",
            "0,11",
            "NaN",
            "inf",
            "99999999999999999999",
        ] {
            assert!(parse_decimal(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(SAMPLE);
        assert_eq!(t.price("marketing", "12425551234"), Some(Micros(90_000)));
        assert_eq!(t.market("12425551234"), "bahamas");
        assert_eq!(t.price("marketing", "16505551234"), Some(Micros(20_700)));
        assert_eq!(t.market("16505551234"), "north_america");
        assert_eq!(
            t.price("marketing", "+4917012345678"),
            Some(Micros(113_100))
        );
        assert_eq!(t.market("4917012345678"), "germany");
    }

    #[test]
    fn default_fallback() {
        let t = table(SAMPLE);
        // No market: the default.
        assert_eq!(t.market("33612345678"), "other");
        assert_eq!(t.price("marketing", "33612345678"), Some(Micros(50_000)));
        // Market without the category: the default's price for it.
        assert_eq!(
            t.price("authentication-international", "4917012345678"),
            Some(Micros(30_000))
        );
        // The webhook origin spelling prices too.
        assert_eq!(
            t.price("authentication_international", "4917012345678"),
            Some(Micros(30_000))
        );
        // Neither has it, or the category is unknown: no price.
        assert_eq!(t.price("utility", "4917012345678"), None);
        assert_eq!(t.price("utility", "16505551234"), Some(Micros(2_800)));
        assert_eq!(t.price("carrier_pigeon", "16505551234"), None);
        // Junk recipients fall to the default and never panic.
        assert_eq!(t.market(""), "other");
        assert_eq!(t.market("é1"), "other");
        assert_eq!(t.price("marketing", "abc"), Some(Micros(50_000)));
    }

    #[test]
    fn empty_table_knows_no_price() {
        let t = PricesFile::default().validate().expect("default is valid");
        assert_eq!(t.currency(), "EUR");
        assert_eq!(t.price("marketing", "4917012345678"), None);
        assert_eq!(t.market("4917012345678"), "other");
        assert_eq!(PriceTable::default().price("marketing", "49"), None);
    }

    #[test]
    fn duplicate_calling_code_rejected_with_key() {
        let p = problems(
            r#"
            [prices]
            currency = "EUR"
            [prices.markets.austria]
            calling_codes = ["43"]
            [prices.markets.rest_of_western_europe]
            calling_codes = ["43", "32", "32"]
            "#,
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(
            p[0].0,
            "prices.markets.rest_of_western_europe.calling_codes"
        );
        assert!(
            p[0].1.contains("\"43\"") && p[0].1.contains("austria"),
            "{p:?}"
        );
        assert!(p[1].1.contains("listed twice"), "{p:?}");
    }

    #[test]
    fn unknown_category_and_bad_values_rejected_with_keys() {
        let p = problems(
            r#"
            [prices]
            currency = "eur"
            [prices.default]
            utility = "-0.01"
            [prices.markets.germany]
            calling_codes = ["049", "12345", "4a"]
            marketting = "0.1131"
            authentication_international = "0.03"
            [prices.markets.other]
            calling_codes = ["33"]
            [prices.markets.nowhere]
            "#,
        );
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "prices.currency",
                "prices.default.utility",
                "prices.markets.germany.calling_codes",
                "prices.markets.germany.calling_codes",
                "prices.markets.germany.calling_codes",
                "prices.markets.germany.authentication_international",
                "prices.markets.germany.marketting",
                "prices.markets.nowhere.calling_codes",
                "prices.markets.other",
            ],
            "{p:#?}"
        );
        assert!(p[6].1.contains("unknown pricing category"));
    }

    #[test]
    fn toml_floats_and_unknown_fields_refused() {
        let float = "[prices]\ncurrency = \"EUR\"\n[prices.default]\nmarketing = 0.1131\n";
        let err = parse(float).err().expect("a float price is refused");
        assert!(err.contains("prices.default.marketing"), "{err}");
        let typo = "[prices]\ncurrency = \"EUR\"\ncurrencies = \"USD\"\n";
        let err = parse(typo).err().expect("an unknown key is refused");
        assert!(err.contains("currencies"), "{err}");
        // Only the currency is required.
        let minimal = table("[prices]\ncurrency = \"USD\"\n");
        assert_eq!(minimal.currency(), "USD");
    }

    #[test]
    fn billed_truth_table() {
        for billable in [None, Some(true), Some(false)] {
            assert!(billed(billable, Some("regular")));
            assert!(!billed(billable, Some("free_customer_service")));
            assert!(!billed(billable, Some("free_entry_point")));
        }
        assert!(billed(Some(true), None));
        assert!(!billed(Some(false), None));
        assert!(!billed(None, None));
        // A type this code does not know yet: trust the flag while Meta still sends it.
        assert!(billed(Some(true), Some("some_future_type")));
        assert!(!billed(Some(false), Some("some_future_type")));
        assert!(!billed(None, Some("some_future_type")));
    }

    #[test]
    fn micros_formatting() {
        assert_eq!(Micros(113_100).to_decimal_string(), "0.1131");
        assert_eq!(Micros(100_000).to_decimal_string(), "0.10");
        assert_eq!(Micros(1_000_000).to_decimal_string(), "1.00");
        assert_eq!(Micros(0).to_decimal_string(), "0.00");
        assert_eq!(Micros(1).to_decimal_string(), "0.000001");
        assert_eq!(Micros(123_456_789).to_decimal_string(), "123.456789");
        assert_eq!(Micros(-50_000).to_decimal_string(), "-0.05");
        assert_eq!(
            Micros(i64::MIN).to_decimal_string(),
            "-9223372036854.775808"
        );
        assert_eq!(Micros(2_800).to_string(), "0.0028");
    }

    #[test]
    fn sum_of_a_thousand_prices_is_exact() {
        let t = table(SAMPLE);
        let one = t.price("marketing", "4917012345678").expect("priced");
        let total: Micros = (0..1_000).map(|_| one).sum();
        assert_eq!(total, Micros(113_100_000));
        assert_eq!(total.to_decimal_string(), "113.10");
        let by_ref: Micros = [one, one].iter().sum();
        let mut acc = Micros::default();
        acc += one;
        assert_eq!(by_ref, acc + one);
    }

    #[test]
    fn example_config_validates() {
        let f = file(include_str!("../config/prices.example.toml"));
        let t = f.clone().validate().expect("the example validates");
        assert_eq!(t.currency(), "EUR");
        assert_eq!(t.effective(), Some("2026-10-01"));
        assert!(t.source().is_some());

        // The one EUR figure the facts give directly.
        assert_eq!(t.market("4915112345678"), "germany");
        assert_eq!(t.price("marketing", "4915112345678"), Some(Micros(113_100)));
        // A three-digit code inside a region, and the NANP region.
        assert_eq!(t.market("358401234567"), "rest_of_western_europe");
        assert_eq!(t.market("12025550123"), "north_america");

        let expected = [
            ("49", "germany"),
            ("33", "france"),
            ("39", "italy"),
            ("34", "spain"),
            ("31", "netherlands"),
            ("48", "poland"),
            ("43", "rest_of_western_europe"),
            ("32", "rest_of_western_europe"),
            ("45", "rest_of_western_europe"),
            ("358", "rest_of_western_europe"),
            ("353", "rest_of_western_europe"),
            ("47", "rest_of_western_europe"),
            ("351", "rest_of_western_europe"),
            ("46", "rest_of_western_europe"),
            ("41", "rest_of_western_europe"),
            ("44", "united_kingdom"),
            ("91", "india"),
            ("55", "brazil"),
            ("1", "north_america"),
        ];
        for (code, market) in expected {
            assert_eq!(t.market(&format!("{code}123456789")), market, "{code}");
        }

        // From 2026-10-01 service is charged at the market's utility rate.
        for (name, m) in &f.markets {
            assert_eq!(m.prices.get("service"), m.prices.get("utility"), "{name}");
        }
        assert_eq!(f.default.get("service"), f.default.get("utility"));
    }

    #[test]
    fn category_labels_are_meta_categories_or_other() {
        assert_eq!(category_label("marketing_lite"), "marketing_lite");
        assert_eq!(
            category_label("authentication_international"),
            "authentication-international"
        );
        // Whatever else a webhook carries is one label, never a new one.
        assert_eq!(category_label("+491701234567"), "other");
        assert_eq!(category_label(""), "other");
    }
}
