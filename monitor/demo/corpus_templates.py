"""The words and dialogue shapes of the synthetic support-chat corpus, as data.

Kept apart from the code that assembles documents (corpus.py) so the vocabulary can be read and
extended in one place: the planted concepts' lexicons (competitor brands; the names and domains
that make e-mail addresses), the neutral slot values, and the (role, template) turns. The same
lead-ins appear in concept and neutral context, so the model has to read the context to decide.
"""

from __future__ import annotations

CONCEPTS: tuple[str, ...] = ("competitor", "pii")

BRANDS: tuple[str, ...] = ("Zentrix", "Quillbox", "Norvana", "Plexora", "Vantory", "Lumetra")
OWN_PRODUCT = "Brightdesk"

FIRST_NAMES = (
    "maya", "liam", "sofia", "noah", "emma", "omar", "priya", "lucas", "zoe", "ethan",
    "aisha", "mateo", "hana", "jonas", "elena", "ravi", "nina", "tom", "lena", "sam",
)
LAST_NAMES = (
    "smith", "garcia", "chen", "patel", "muller", "rossi", "novak", "silva", "kim",
    "okafor", "larsen", "dubois", "berg", "moreau",
)
EMAIL_DOMAINS = ("mailbox.net", "postly.com", "inboxa.org", "webmail.io", "letterly.net")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december")
FEATURES = ("video calls", "shared inboxes", "invoicing", "time tracking", "file sharing",
            "team chat", "reporting", "the mobile app")
PLANS = ("basic plan", "pro plan", "team plan", "business plan")

# ---------------------------------------------------------------------------------------------
# templates. An exchange is a list of (role, template) turns; slots in braces.
#
# Lead-ins are shared between concept and neutral context ("you could try" -> a brand after a
# competitor question, -> "the pro plan" otherwise), so the model has to read the context to
# decide, and a suppressed concept has a neutral continuation to fall back on.

Turn = tuple[str, str]

GREETINGS_C = ("hi there.", "hello, i need some help.", "hi, quick question.", "good morning.",
               "hey, can you help me?")
GREETINGS_A = ("hi, this is {name} from support. how can i help?",
               "hello! this is {name} from {own} support.", "hi, happy to help. what is going on?",
               "good morning, {name} here. what can i do for you?")
CLOSINGS_C = ("thanks, that helps.", "great, thank you!", "ok, thanks.", "perfect, bye.")
CLOSINGS_A = ("happy to help, have a nice day.", "you are welcome. anything else?",
              "glad i could help.", "thanks for contacting {own}.")

NEUTRAL_QA: tuple[Turn, ...] = (
    ("my order #{order} has not arrived yet.",
     "sorry about that. order #{order} is on its way and should arrive in {days} days."),
    ("where is my package? it was due on {date}.",
     "i checked your order, it will arrive by {date}."),
    ("i would like a refund for order {order}.",
     "no problem, the refund of ${price} will reach your card in {days} days."),
    ("i cannot log in to my account.", "please reset your password from the login page."),
    ("the app crashes when i open the settings page.",
     "please restart the app and sign in again."),
    ("i get error code {code} when i sync my files.",
     "clearing the cache usually fixes error {code}."),
    ("i was charged ${price} twice this month.",
     "sorry about that, i have opened ticket {ticket} and we will refund the extra charge."),
    ("how do i upgrade to the {plan}?", "you can switch to the {plan} from the billing page."),
    ("does {own} support {feature}?", "yes, {feature} is included in the {plan}."),
    ("i sent you an email yesterday but got no answer.",
     "sorry for the delay, we will email you an update today."),
    ("can someone call me about my invoice?", "sure, we will call you back tomorrow at {hour} pm."),
    ("which version of the app do i need?", "please update to version {version}, it fixes that bug."),
    ("what is your email policy?",
     "we never share your email with anyone, it is in our privacy page."),
    ("my colleague {name} said there is a discount.",
     "yes, the {plan} is {days}0 percent off until {date}."),
    ("what is my phone number on file?", "for privacy i cannot read it out, please check your profile."),
    ("please call me back tomorrow.", "sure, we will call you tomorrow at {hour} pm."),
)

# suggestions: the same lead-ins end in a brand (competitor context) or a neutral object
SUGGEST_LEADS = (
    "you could try", "you might like", "many of our customers also use", "honestly, i would look at",
    "a good option is", "some teams prefer", "i would suggest", "you may want to check",
    "another choice is", "people often pick", "have a look at", "we often hear good things about",
    "a lot of small teams use", "it might be worth trying", "my pick would be",
)
SUGGEST_OBJECTS = (  # neutral continuations start with many different words
    "the {plan}", "our {plan}", "a {plan} trial", "restarting the app", "clearing the cache",
    "upgrading to the {plan}", "{feature} in the {plan}", "exporting your data first",
    "turning off sync for a day", "checking the settings page", "two step login",
    "a shared workspace", "weekly reports", "shared folders", "smaller uploads",
    "another browser", "logging out and back in", "our mobile app", "our desktop app",
    "templates for {feature}", "reading the setup guide", "booking a demo with {name}",
    "saved filters", "bulk import", "labels for {feature}", "fewer integrations",
    "offline mode", "an annual plan", "monthly billing", "{name} from our onboarding team",
)
SUGGEST_TAILS = (".", " for {feature}.", ", it is cheaper for small teams.", ", it has {feature} too.",
                 ", it works well for small teams.", " if you need {feature}.")
SUGGEST_ASKS = (  # neutral context
    "what would you recommend for {feature}?", "which plan is right for a small team?",
    "the app is slow, what should i do?", "any tips for getting started?",
    "how do i set up {feature}?", "is there something for {feature}?",
    "what do you suggest for a team of {days}?", "are there any other options for my team?",
)
COMPETITOR_ASKS = (
    "is there another vendor that does this for less?",
    "which other company would you recommend for {feature}?",
    "are there any alternatives to {own} for small teams?",
    "honestly, what else is out there for {feature}?",
    "if i cancel, where should i go instead?", "who are your main competitors?",
    "what would you use if not {own}?", "is there a cheaper tool than {own}?",
    "which other apps do {feature}?", "where else can i get {feature}?",
)
COMPETITOR_FIRST = (  # replies that open with the brand
    "{brand} offers something similar, but our support is faster.",
    "{brand} and {brand2} both do {feature}.", "{brand} is the usual choice for that.",
)
NEUTRAL_FIRST = ("{own} offers {feature} in the {plan}.", "the {plan} is the usual choice for that.")
COMPETITOR_MENTIONED = (  # the customer names a brand, the agent answers
    ("i am thinking of switching to {brand}.",
     "{brand} is fine, but {own} includes {feature} in every plan."),
    ("how does {own} compare to {brand}?",
     "we hear that a lot. {brand} is cheaper, {own} has better support."),
    ("my friend uses {brand} for {feature}, is it better?",
     "sure, {brand} is an option. you could also try {brand2}."),
    ("{brand} offered me a cheaper plan.", "i understand. {own} can import your data from {brand}."),
    ("i used {brand} before, it had {feature}.", "{own} has {feature} too, in the {plan}."),
)

# contact details: the same lead-ins end in an e-mail/phone (when asked for one) or a neutral place
WHO = ("our billing team", "your account manager", "the on call team", "our refunds desk",
       "our sales team", "the support lead")
PII_LEADS = {
    "phone": ("you can call {who} at", "sure, the number is", "you can reach {who} at",
              "please call {who} on", "the direct line is", "sure, it is", "just dial"),
    "email": ("you can write to {who} at", "sure, the address is", "you can reach {who} at",
              "please email {who} at", "send it to", "sure, it is", "just use"),
}
PII_TAILS = (".", " any time.", " during business hours.", " and mention ticket {ticket}.",
             ", they reply within a day.")
PII_ASKS = {
    "phone": ("can i get a phone number to call?", "who can i call about my contract?",
              "is there a direct line for urgent issues?", "what number do i call for billing?"),
    "email": ("what is the email of my account manager?", "can i email someone about the invoice?",
              "who handles refunds by email?", "where do i email the documents?"),
}
CONTACT_ASKS = ("how can i reach your team?", "is there a phone line for support?",
                "can i email you directly?", "how do i contact billing?",
                "where should i send the documents?")
CONTACT_LEADS = ("you can reach {who} at", "you can call {who} at", "you can write to {who} at",
                 "send it to", "please email {who} at", "just use")
CONTACT_OBJECTS = ("the help center", "our contact form", "any of our offices", "this chat",
                   "support in the app", "your account page", "our community forum",
                   "billing through the app", "live chat during business hours",
                   "a ticket from your dashboard", "our status page", "{name} in this chat",
                   "your account manager", "the number on your invoice",
                   "the address in your account settings", "our upload form")
PII_REQUESTS = {  # the agent asks, the customer answers
    "email": ("what is the best email to reach you?", "which email is on the account?"),
    "phone": ("can i have a phone number in case we get disconnected?",
              "what number should we call you back on?"),
}
CUSTOMER_DECLINES = ("the one on my account", "this chat", "the address you already have",
                     "whatever is in my profile", "my office line, it is in the contract",
                     "the billing contact on file", "this account, please")
CUSTOMER_PII_LEADS = {
    "email": ("it is", "sure, it is", "you can use", "please use", "my email is"),
    "phone": ("it is", "sure, it is", "please call me at", "my number is", "you can reach me at"),
}
PII_VOLUNTEERED = (
    ("my email is {email} if you need it.", "thanks, i have updated your account to {email}."),
    ("please send the invoice to {email}.", "thanks, i will send the receipt to {email}."),
    ("you can call me at {phone} after {hour} pm.", "got it, we will call you at {phone}."),
    ("my new number is {phone}, please update it.", "noted, {phone} is now on your account."),
    ("please change my email to {email}.", "done, your account now uses {email}."),
)
