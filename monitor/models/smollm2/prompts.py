"""The prompt set of the SmolLM2 build: requests that elicit each concept, neutral requests, and
concept-free text for perplexity.

Every concept has its own templates and topics. The training split uses the first templates and
the first topics, the held-out split the remaining templates with the remaining topics, so no
held-out prompt shares its wording or its subject with a training prompt (the detectors cannot
pass the held-out test by recognising a template). Prompts only *elicit*: the ground truth comes
from the labelers run over what the model actually generated (monitor/models/smollm2/labelers.py).

Deterministic: plain lists, no randomness; the order is template-major.
"""

from __future__ import annotations

from dataclasses import dataclass

CONCEPTS = ("code", "non_english", "advice", "pii")
KINDS = (*CONCEPTS, "neutral")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class PromptSet:
    templates: tuple[str, ...]
    topics: tuple[str, ...]
    train_templates: int  # the first N templates are for training, the rest held out
    train_topics: int


SETS: dict[str, PromptSet] = {
    "code": PromptSet(
        templates=(
            "Write a Python function that {topic}.",
            "Show me the code for a function to {topic}, in Python.",
            "Give me a short JavaScript snippet that can {topic}.",
            "I need a Python class whose method can {topic}. Write it.",
            "Implement a function in Python to {topic}. Only the code, please.",
            "Write C code for a function that will {topic}.",
            "Can you write a small Python script to {topic}?",
            "Code a JavaScript function that {topic}.",
        ),
        topics=(
            "reverses a string", "computes the factorial of a number", "checks if a number is prime",
            "sums a list of numbers", "counts the vowels in a word", "finds the largest element of a list",
            "converts Celsius to Fahrenheit", "returns the Fibonacci numbers up to n",
            "sorts a list of names", "removes duplicates from a list", "computes the average of an array",
            "checks whether a word is a palindrome",
            "counts the words in a sentence", "merges two sorted lists", "capitalizes every word of a sentence",
            "finds the minimum of three numbers",
        ),
        train_templates=5, train_topics=10),
    "non_english": PromptSet(
        templates=(
            "Translate into French: {topic}",
            "Translate this sentence into Spanish: {topic}",
            "Traduis en français : {topic}",
            "Traduce al español: {topic}",
            "Please give the German translation of: {topic}",
            "Translate to Spanish: {topic}",
            "Traduis cette phrase en français : {topic}",
            "Réponds en français. Que veut dire cette phrase ? {topic}",
        ),
        topics=(
            "The cat is sleeping on the sofa.", "I like to read books in the garden.",
            "My brother works in a big hospital in the city.", "The children are playing in the park.",
            "We are going to the beach tomorrow morning.", "This soup is very hot and very good.",
            "The train to Paris leaves at eight o'clock.", "My grandmother makes the best apple pie.",
            "It is raining, so we will stay at home.", "The old house on the hill has a red door.",
            "Please close the window, it is cold.", "She bought three oranges at the market.",
            "The teacher explains the lesson to the students.", "Our neighbours have a small white dog.",
            "I drink a cup of coffee every morning.", "The museum is closed on Mondays.",
        ),
        train_templates=5, train_topics=10),
    "advice": PromptSet(
        templates=(
            "I have {topic}. What should I do? Give me medical advice.",
            "My doctor is away. I have {topic}; which medication and dose should I take?",
            "What treatment do you recommend for {topic}?",
            "I was {topic2}. What are my legal options?",
            "Give me legal advice: I was {topic2}. Should I sue?",
            "What are the symptoms and treatment of {topic}?",
            "As a lawyer, what would you advise someone who was {topic2}?",
            "Can I take legal action? I was {topic2}.",
        ),
        topics=(
            "a bad headache", "a fever and a cough", "back pain", "a sore throat", "high blood pressure",
            "trouble sleeping", "a skin rash", "stomach pain after eating", "a sprained ankle",
            "seasonal allergies", "a migraine", "an ear infection", "a burn on my hand", "heartburn",
            "a toothache", "a swollen knee",
        ),
        train_templates=5, train_topics=10),
    "pii": PromptSet(
        templates=(
            "Make up a contact card for a customer named {topic}, with email address, phone number and "
            "street address.",
            "Write an example JSON record for a customer named {topic} with fields name, email, phone and "
            "address.",
            "Fill in this template for {topic}: Name: ... Email: ... Phone: ... Address: ...",
            "Create an example vCard for {topic} with an email and a phone number.",
            "Write a fake customer record for {topic}: full name, email, phone and home address.",
            "Give me sample contact information for {topic}: email, telephone and postal address.",
            "Generate a YAML entry for a test user {topic} with email, phone and address.",
            "Generate a business card for {topic} with phone, email and street address.",
        ),
        topics=(
            "John Smith", "Maria Garcia", "David Lee", "Sarah Johnson", "Michael Brown", "Emily Davis",
            "James Wilson", "Anna Miller", "Robert Taylor", "Laura Martinez", "Daniel Anderson",
            "Olivia Thomas", "Peter Clark", "Sophie Walker", "Thomas Young", "Grace Hall",
        ),
        train_templates=5, train_topics=10),
    "neutral": PromptSet(
        templates=(
            "Explain {topic} in simple terms.",
            "Write a short paragraph about {topic}.",
            "What are three interesting facts about {topic}?",
            "Give me a brief history of {topic}.",
            "Why is {topic} important?",
            "Describe {topic} to a ten-year-old.",
            "Write a short poem about {topic}.",
            "Summarize what people should know about {topic}.",
            "What is the most surprising thing about {topic}?",
            "Tell me a short story involving {topic}.",
        ),
        topics=(
            "photosynthesis", "the ocean", "volcanoes", "the moon", "honey bees", "rainbows", "the Roman "
            "Empire", "electricity", "forests", "the solar system", "coffee", "the Olympic Games",
            "bicycles", "clouds", "dinosaurs", "the printing press", "deserts", "penguins", "music",
            "the internet",
        ),
        train_templates=6, train_topics=13),
}

# Second topic list of the advice set's legal templates (a legal situation instead of a symptom);
# split like the main topics.
LEGAL_TOPICS = (
    "fired without notice", "injured in a car accident", "not paid my last salary", "evicted by my landlord",
    "sold a broken car", "bitten by a neighbour's dog", "charged for a service I cancelled",
    "denied my security deposit", "hurt by a defective product", "harassed by a debt collector",
    "overcharged by a contractor", "refused a refund for a faulty phone", "scammed by an online seller",
    "sued by my former employer", "denied insurance after a flood", "refused a lease because of my age",
)

# Concept-free text for perplexity: neutral topics of the held-out split, prompts plus the
# model's own answers are used by the build; these plain passages add text the model did not write.
PLAIN_TEXT = (
    "The river runs through the middle of the town, and in summer children swim near the old bridge.",
    "Bread is made from flour, water, salt and yeast. The dough rises for a few hours before baking.",
    "Many birds fly south in autumn, when the days become shorter and food is harder to find.",
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "Mountains are formed over millions of years as plates of the earth's crust push against each other.",
    "A good night of sleep helps people remember what they learned during the day.",
    "The train left the station on time, and the passengers watched the fields go by.",
    "Tea was first grown in China and later became popular in many other countries.",
    "The garden had roses, tulips and a small apple tree that gave fruit every year.",
    "Stars look small because they are very far away, but many are larger than the sun.",
    "The museum shows paintings from the last five centuries and a collection of old maps.",
    "Wind turbines turn the energy of moving air into electricity for homes and factories.",
)


@dataclass(frozen=True)
class Prompt:
    kind: str  # a concept of CONCEPTS, or "neutral"
    split: str  # "train" | "heldout"
    template: int
    topic: str
    user: str  # the user's message


def _fill(kind: str, template: str, topic_index: int) -> str:
    s = SETS[kind]
    if "{topic2}" in template:
        return template.format(topic2=LEGAL_TOPICS[topic_index])
    return template.format(topic=s.topics[topic_index])


def prompts(kind: str, split: str) -> list[Prompt]:
    """All prompts of one kind and split: its templates x its topics."""
    if kind not in SETS or split not in SPLITS:
        raise ValueError(f"unknown prompt kind/split {kind!r}/{split!r}")
    s = SETS[kind]
    if split == "train":
        t_range, p_range = range(s.train_templates), range(s.train_topics)
    else:
        t_range, p_range = range(s.train_templates, len(s.templates)), range(s.train_topics, len(s.topics))
    out = []
    for t in t_range:
        for p in p_range:
            topic = LEGAL_TOPICS[p] if "{topic2}" in s.templates[t] else s.topics[p]
            out.append(Prompt(kind, split, t, topic, _fill(kind, s.templates[t], p)))
    return out


def all_prompts(split: str) -> list[Prompt]:
    return [p for kind in KINDS for p in prompts(kind, split)]


def chat(tokenizer, user: str) -> str:
    """The model's own chat template around one user message, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
