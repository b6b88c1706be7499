using System.Text.Json;

namespace LoraSharp.Text;

/// <summary>The special-token settings of an HF model folder (tokenizer_config.json and generation_config.json).</summary>
public sealed record TokenizerSettings
{
    public string? BosToken { get; init; }
    public string? EosToken { get; init; }
    public string? PadToken { get; init; }
    /// <summary>Whether a BOS is put before encoded text (tokenizer_config add_bos_token; Llama default true).</summary>
    public bool AddBosToken { get; init; } = true;
    public bool AddEosToken { get; init; }
    /// <summary>The Jinja chat template text, used only to recognise which of the known formats it is.</summary>
    public string? ChatTemplate { get; init; }
    /// <summary>Added tokens from added_tokens_decoder (content → id).</summary>
    public IReadOnlyDictionary<string, int> AddedTokens { get; init; } = new Dictionary<string, int>();
    /// <summary>generation_config.json eos_token_id (one or several).</summary>
    public IReadOnlyList<int> GenerationEosIds { get; init; } = [];
    public int? GenerationBosId { get; init; }
    public int? GenerationPadId { get; init; }

    /// <summary>Reads the settings in <paramref name="folder"/>; missing files give defaults.</summary>
    public static TokenizerSettings Read(string folder)
    {
        var settings = new TokenizerSettings();
        var configPath = Path.Combine(folder, "tokenizer_config.json");
        if (File.Exists(configPath))
        {
            using var doc = ParseJson(configPath);
            var root = doc.RootElement;
            var added = new Dictionary<string, int>();
            if (root.TryGetProperty("added_tokens_decoder", out var dec) && dec.ValueKind == JsonValueKind.Object)
                foreach (var e in dec.EnumerateObject())
                {
                    if (!int.TryParse(e.Name, out var id))
                        throw new LoraSharpException("added_tokens_decoder keys must be token ids", configPath, "added_tokens_decoder." + e.Name);
                    added[e.Value.GetProperty("content").GetString()!] = id;
                }
            settings = settings with
            {
                BosToken = TokenText(root, "bos_token"),
                EosToken = TokenText(root, "eos_token"),
                PadToken = TokenText(root, "pad_token"),
                AddBosToken = root.TryGetProperty("add_bos_token", out var ab) ? ab.ValueKind == JsonValueKind.True : settings.AddBosToken,
                AddEosToken = root.TryGetProperty("add_eos_token", out var ae) && ae.ValueKind == JsonValueKind.True,
                ChatTemplate = ChatTemplateText(root),
                AddedTokens = added,
            };
        }
        var generationPath = Path.Combine(folder, "generation_config.json");
        if (File.Exists(generationPath))
        {
            using var doc = ParseJson(generationPath);
            var root = doc.RootElement;
            settings = settings with
            {
                GenerationEosIds = root.TryGetProperty("eos_token_id", out var eos)
                    ? eos.ValueKind == JsonValueKind.Array ? eos.EnumerateArray().Select(e => e.GetInt32()).ToArray()
                    : eos.ValueKind == JsonValueKind.Number ? [eos.GetInt32()] : []
                    : [],
                GenerationBosId = root.TryGetProperty("bos_token_id", out var bos) && bos.ValueKind == JsonValueKind.Number ? bos.GetInt32() : null,
                GenerationPadId = root.TryGetProperty("pad_token_id", out var pad) && pad.ValueKind == JsonValueKind.Number ? pad.GetInt32() : null,
            };
        }
        return settings;
    }

    static JsonDocument ParseJson(string path)
    {
        try { return JsonDocument.Parse(File.ReadAllText(path)); }
        catch (JsonException e) { throw new LoraSharpException("invalid JSON: " + e.Message, path, inner: e); }
    }

    /// <summary>"bos_token": "&lt;s&gt;" or {"content": "&lt;s&gt;", ...} or null.</summary>
    static string? TokenText(JsonElement root, string key) =>
        !root.TryGetProperty(key, out var v) ? null
        : v.ValueKind == JsonValueKind.String ? v.GetString()
        : v.ValueKind == JsonValueKind.Object && v.TryGetProperty("content", out var c) ? c.GetString()
        : null;

    /// <summary>"chat_template": a string, or a list of {name, template} (the "default" one is taken).</summary>
    static string? ChatTemplateText(JsonElement root)
    {
        if (!root.TryGetProperty("chat_template", out var v)) return null;
        if (v.ValueKind == JsonValueKind.String) return v.GetString();
        if (v.ValueKind == JsonValueKind.Array)
            foreach (var t in v.EnumerateArray())
                if (t.TryGetProperty("name", out var n) && n.GetString() == "default")
                    return t.GetProperty("template").GetString();
        return null;
    }
}

/// <summary>
/// A model folder's tokenizer with its special tokens, stop tokens and chat format: <c>tokenizer.json</c> (byte-level
/// BPE: Llama 3, Qwen2) or <c>tokenizer.model</c> (SentencePiece: Llama 1/2, Mistral), plus tokenizer_config.json and
/// generation_config.json.
/// </summary>
public sealed class LlmTokenizer
{
    public ITextTokenizer Tokenizer { get; }
    public TokenizerSettings Settings { get; }
    public int? BosId { get; }
    public int? EosId { get; }
    public int? PadId { get; }
    /// <summary>Ids that end generation: EOS, generation_config's eos ids, and the chat format's end-of-turn token.</summary>
    public IReadOnlyList<int> StopTokenIds { get; }
    /// <summary>The chat format detected from the chat template (null when there is none or it is not a known one).</summary>
    public ChatFormat? ChatFormat { get; }

    public LlmTokenizer(ITextTokenizer tokenizer, TokenizerSettings settings)
    {
        Tokenizer = tokenizer;
        Settings = settings;
        BosId = Lookup(settings.BosToken) ?? settings.GenerationBosId ?? tokenizer.BosId;
        EosId = Lookup(settings.EosToken) ?? tokenizer.EosId;
        PadId = Lookup(settings.PadToken) ?? settings.GenerationPadId ?? tokenizer.PadId;
        ChatFormat = settings.ChatTemplate is null ? null : ChatTemplates.Detect(settings.ChatTemplate);
        var stops = new List<int>();
        if (EosId is int eos) stops.Add(eos);
        stops.AddRange(settings.GenerationEosIds);
        if (ChatFormat is { } format && Lookup(ChatTemplates.EndOfTurnToken(format)) is int endOfTurn) stops.Add(endOfTurn);
        StopTokenIds = stops.Distinct().ToArray();
    }

    int? Lookup(string? token) => token is null ? null : Tokenizer.TokenToId(token);

    /// <summary>Loads the tokenizer of an HF model folder (tokenizer.json preferred when it is byte-level BPE).</summary>
    public static LlmTokenizer Load(string folder)
    {
        if (!Directory.Exists(folder)) throw new LoraSharpException("tokenizer folder not found", folder);
        var settings = TokenizerSettings.Read(folder);
        var json = Path.Combine(folder, "tokenizer.json");
        var model = Path.Combine(folder, "tokenizer.model");
        ITextTokenizer tokenizer;
        if (File.Exists(model))
            tokenizer = SentencePieceTokenizer.Load(model, settings.AddedTokens);
        else if (File.Exists(json))
            tokenizer = ByteLevelBpeTokenizer.Load(json);
        else
            throw new LoraSharpException("no tokenizer found: expected tokenizer.model or tokenizer.json", folder);
        return new LlmTokenizer(tokenizer, settings);
    }

    /// <summary>Plain text → ids, with BOS/EOS as the tokenizer config says (override with the arguments).</summary>
    public IReadOnlyList<int> Encode(string text, bool? addBos = null, bool? addEos = null)
    {
        var ids = new List<int>();
        if ((addBos ?? Settings.AddBosToken) && BosId is int bos) ids.Add(bos);
        ids.AddRange(Tokenizer.Encode(text));
        if ((addEos ?? Settings.AddEosToken) && EosId is int eos) ids.Add(eos);
        return ids;
    }

    /// <summary>
    /// A conversation rendered with <paramref name="format"/> (default: the detected one) and tokenized with its special
    /// tokens recognised. The rendered text starts with the BOS token where the format has it.
    /// </summary>
    public IReadOnlyList<int> EncodeChat(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt = true, ChatFormat? format = null)
    {
        var chosen = format ?? ChatFormat
            ?? throw new LoraSharpException("the tokenizer has no known chat template; pass a ChatFormat");
        var defaultSystem = chosen == Text.ChatFormat.ChatML && Settings.ChatTemplate?.Contains(ChatTemplates.QwenDefaultSystemPrompt, StringComparison.Ordinal) == true
            ? ChatTemplates.QwenDefaultSystemPrompt : null;
        var text = ChatTemplates.Render(chosen, messages, addGenerationPrompt, Settings.BosToken ?? "<s>", Settings.EosToken ?? "</s>", defaultSystem);
        return Tokenizer.EncodeWithSpecialTokens(text);
    }

    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true) => Tokenizer.Decode(ids, skipSpecialTokens);
}
