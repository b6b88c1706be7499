using System.IO.Compression;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoraSharp.Text;

/// <summary>
/// The CLIP byte-level BPE tokenizer used by Stable Diffusion's text encoders (OpenAI CLIP / transformers'
/// CLIPTokenizer semantics): whitespace_clean + lower-case, the CLIP pre-tokenizer regex, the GPT-2 byte-to-unicode
/// map, a '&lt;/w&gt;' end-of-word suffix on the last symbol of every word, and BPE merges applied by rank.
/// <see cref="Encode"/> gives the 77-id model input (BOS, first 75 tokens, EOS, padding).
/// </summary>
public sealed partial class ClipTokenizer
{
    public const string StartOfText = "<|startoftext|>";
    public const string EndOfText = "<|endoftext|>";
    const string EndOfWord = "</w>";

    readonly Dictionary<string, int> _vocab;
    readonly string[] _idToToken;
    readonly Dictionary<(string, string), int> _mergeRanks;
    readonly string[] _byteToUnicode = BuildByteToUnicode();
    readonly Dictionary<char, byte> _unicodeToByte;
    readonly Dictionary<string, string[]> _cache = new(StringComparer.Ordinal);
    readonly Lock _cacheLock = new();

    /// <summary>Id of &lt;|startoftext|&gt; (49406 for CLIP).</summary>
    public int BosId { get; }

    /// <summary>Id of &lt;|endoftext|&gt; (49407 for CLIP).</summary>
    public int EosId { get; }

    /// <summary>Id used to pad to <see cref="MaxLength"/> (SD1.x: &lt;|endoftext|&gt;; SD2/SDXL's second encoder: 0).</summary>
    public int PadId { get; }

    /// <summary>Context length of the text encoder including BOS and EOS (77).</summary>
    public int MaxLength { get; }

    /// <summary>Number of entries in the vocabulary (49408 for CLIP).</summary>
    public int VocabSize => _idToToken.Length;

    /// <summary>Id of the ',' word ("," + "&lt;/w&gt;"), used by A1111's comma word-wrap of long prompts.</summary>
    public int CommaId => _vocab.TryGetValue("," + EndOfWord, out var id) ? id : -1;

    ClipTokenizer(Dictionary<string, int> vocab, List<(string, string)> merges, int? padId, int maxLength, string source)
    {
        _vocab = vocab;
        _mergeRanks = new Dictionary<(string, string), int>(merges.Count);
        for (int i = 0; i < merges.Count; i++)
            _mergeRanks.TryAdd(merges[i], i);
        int size = vocab.Count == 0 ? 0 : vocab.Values.Max() + 1;
        _idToToken = new string[size];
        foreach (var (token, id) in vocab)
        {
            if (id < 0)
                throw new LoraSharpException($"vocabulary id {id} is negative", source, token);
            _idToToken[id] = token;
        }
        _unicodeToByte = new Dictionary<char, byte>(256);
        for (int b = 0; b < 256; b++)
            _unicodeToByte[_byteToUnicode[b][0]] = (byte)b;
        BosId = vocab.TryGetValue(StartOfText, out var bos) ? bos : throw new LoraSharpException($"vocabulary has no {StartOfText}", source);
        EosId = vocab.TryGetValue(EndOfText, out var eos) ? eos : throw new LoraSharpException($"vocabulary has no {EndOfText}", source);
        PadId = padId ?? EosId;
        MaxLength = maxLength;
    }

    /// <summary>
    /// Loads the tokenizer from a folder: vocab.json + merges.txt (each plain or .gz, as in a diffusers
    /// <c>tokenizer/</c> folder), or OpenAI's bpe_simple_vocab_16e6.txt(.gz). A diffusers model root with a
    /// <c>tokenizer/</c> subfolder works too.
    /// </summary>
    /// <param name="padId">Padding id; null = &lt;|endoftext|&gt; (SD1.x). SD2's OpenCLIP and SDXL's second tokenizer pad with 0.</param>
    public static ClipTokenizer FromFolder(string folder, int? padId = null, int maxLength = 77)
    {
        if (!Directory.Exists(folder))
            throw new LoraSharpException("tokenizer folder not found", folder);
        var sub = Path.Combine(folder, "tokenizer");
        if (FindFile(folder, "vocab.json") is null && FindFile(folder, "bpe_simple_vocab_16e6.txt") is null && Directory.Exists(sub))
            folder = sub;

        var vocabPath = FindFile(folder, "vocab.json");
        var mergesPath = FindFile(folder, "merges.txt");
        if (vocabPath is not null && mergesPath is not null)
        {
            Dictionary<string, int> vocab;
            try
            {
                vocab = JsonSerializer.Deserialize<Dictionary<string, int>>(ReadText(vocabPath))
                        ?? throw new LoraSharpException("vocab.json is empty", vocabPath);
            }
            catch (JsonException e)
            {
                throw new LoraSharpException($"vocab.json is not a JSON object of token → id: {e.Message}", vocabPath, inner: e);
            }
            var merges = ParseMerges(ReadText(mergesPath).Split('\n'), skipHeader: true, mergesPath);
            return new ClipTokenizer(vocab, merges, padId, maxLength, vocabPath);
        }

        var bpePath = FindFile(folder, "bpe_simple_vocab_16e6.txt");
        if (bpePath is not null)
            return FromOpenAiBpe(bpePath, padId, maxLength);

        throw new LoraSharpException("expected vocab.json + merges.txt (plain or .gz) or bpe_simple_vocab_16e6.txt(.gz)", folder);
    }

    /// <summary>Builds the vocabulary from OpenAI's merges file the way CLIP's SimpleTokenizer does.</summary>
    public static ClipTokenizer FromOpenAiBpe(string path, int? padId = null, int maxLength = 77)
    {
        var lines = ReadText(path).Split('\n');
        // SimpleTokenizer: merges = lines[1 : 49152 - 256 - 2 + 1]
        int count = Math.Min(lines.Length - 1, 49152 - 256 - 2);
        var merges = ParseMerges(lines.Skip(1).Take(count), skipHeader: false, path);
        // bytes_to_unicode().values() in insertion order: the printable bytes first, then the remapped ones.
        var byteChars = BuildByteToUnicode().OrderBy(c => c[0]).ToArray();
        var tokens = new List<string>(byteChars);
        tokens.AddRange(byteChars.Select(c => c + EndOfWord));
        tokens.AddRange(merges.Select(m => m.Item1 + m.Item2));
        tokens.Add(StartOfText);
        tokens.Add(EndOfText);
        var vocab = new Dictionary<string, int>(tokens.Count);
        for (int i = 0; i < tokens.Count; i++)
            vocab.TryAdd(tokens[i], i);
        return new ClipTokenizer(vocab, merges, padId, maxLength, path);
    }

    static string? FindFile(string folder, string name)
    {
        var plain = Path.Combine(folder, name);
        if (File.Exists(plain)) return plain;
        var gz = plain + ".gz";
        return File.Exists(gz) ? gz : null;
    }

    static string ReadText(string path)
    {
        using var file = File.OpenRead(path);
        if (path.EndsWith(".gz", StringComparison.OrdinalIgnoreCase))
        {
            try
            {
                using var gz = new GZipStream(file, CompressionMode.Decompress);
                using var reader = new StreamReader(gz, Encoding.UTF8);
                return reader.ReadToEnd();
            }
            catch (InvalidDataException e)
            {
                throw new LoraSharpException($"not a valid gzip file: {e.Message}", path, inner: e);
            }
        }
        using var r = new StreamReader(file, Encoding.UTF8);
        return r.ReadToEnd();
    }

    static List<(string, string)> ParseMerges(IEnumerable<string> lines, bool skipHeader, string path)
    {
        var merges = new List<(string, string)>(49000);
        int lineNo = 0;
        foreach (var raw in lines)
        {
            lineNo++;
            var line = raw.TrimEnd('\r');
            if (line.Length == 0) continue;
            if (skipHeader && lineNo == 1 && line.StartsWith("#version", StringComparison.Ordinal)) continue;
            int space = line.IndexOf(' ');
            if (space <= 0 || space == line.Length - 1 || line.IndexOf(' ', space + 1) >= 0)
                throw new LoraSharpException($"line {lineNo}: expected two symbols separated by one space, got '{line}'", path);
            merges.Add((line[..space], line[(space + 1)..]));
        }
        return merges;
    }

    /// <summary>GPT-2's reversible map from bytes to printable unicode characters.</summary>
    internal static string[] BuildByteToUnicode()
    {
        var bs = new List<int>();
        for (int b = '!'; b <= '~'; b++) bs.Add(b);
        for (int b = 0xA1; b <= 0xAC; b++) bs.Add(b);
        for (int b = 0xAE; b <= 0xFF; b++) bs.Add(b);
        var cs = new List<int>(bs);
        int n = 0;
        for (int b = 0; b < 256; b++)
        {
            if (bs.Contains(b)) continue;
            bs.Add(b);
            cs.Add(256 + n++);
        }
        var map = new string[256];
        for (int i = 0; i < bs.Count; i++)
            map[bs[i]] = ((char)cs[i]).ToString();
        return map;
    }

    // Python's \s (str.isspace) also covers the information separators U+001C..U+001F.
    [GeneratedRegex(@"[\s\x1c-\x1f]+")]
    private static partial Regex Whitespace();

    // CLIP's pre-tokenizer (compiled with IGNORECASE in the original; the text is already lower-cased).
    [GeneratedRegex(@"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", RegexOptions.IgnoreCase | RegexOptions.CultureInvariant)]
    private static partial Regex Pretokenizer();

    /// <summary>whitespace_clean(text).lower(), as transformers' CLIPTokenizer does (ftfy's fix_text taken as identity).</summary>
    public static string Normalize(string text) => PythonLower(Whitespace().Replace(text, " ").Trim(' '));

    /// <summary>
    /// Python's str.lower(): the invariant simple mapping plus the two full-mapping rules that differ from it —
    /// 'İ' (U+0130) becomes "i̇" and a capital sigma ending a word becomes final 'ς'.
    /// </summary>
    static string PythonLower(string text)
    {
        if (text.IndexOf('\u0130') < 0 && text.IndexOf('\u03A3') < 0)
            return text.ToLowerInvariant();
        var sb = new StringBuilder(text.Length + 4);
        for (int i = 0; i < text.Length; i++)
        {
            char c = text[i];
            if (c == '\u0130') sb.Append("i\u0307");
            else if (c == '\u03A3')
            {
                bool afterCased = i > 0 && char.IsLetter(text[i - 1]);
                bool beforeCased = i + 1 < text.Length && char.IsLetter(text[i + 1]);
                sb.Append(afterCased && !beforeCased ? '\u03C2' : '\u03C3');
            }
            else sb.Append(char.ToLowerInvariant(c));
        }
        return sb.ToString();
    }

    /// <summary>The BPE token strings of a text (no BOS/EOS), in byte-unicode form with '&lt;/w&gt;' word ends.</summary>
    public IReadOnlyList<string> Tokenize(string text)
    {
        var result = new List<string>();
        var normalized = Normalize(text);
        foreach (Match m in Pretokenizer().Matches(normalized))
        {
            var word = m.Value;
            if (word == StartOfText || word == EndOfText)
            {
                result.Add(word);
                continue;
            }
            var sb = new StringBuilder(word.Length * 2);
            foreach (var b in Encoding.UTF8.GetBytes(word))
                sb.Append(_byteToUnicode[b]);
            result.AddRange(Bpe(sb.ToString()));
        }
        return result;
    }

    /// <summary>Token ids of a text without BOS/EOS and without truncation.</summary>
    public int[] EncodeTokens(string text)
    {
        var tokens = Tokenize(text);
        var ids = new int[tokens.Count];
        for (int i = 0; i < ids.Length; i++)
            ids[i] = _vocab.TryGetValue(tokens[i], out var id) ? id : throw new LoraSharpException($"BPE produced '{tokens[i]}', which is not in the vocabulary");
        return ids;
    }

    /// <summary>BOS + all tokens + EOS, no truncation or padding.</summary>
    public int[] EncodeUntruncated(string text) => [BosId, .. EncodeTokens(text), EosId];

    /// <summary>The model input: BOS, the first MaxLength-2 tokens, EOS, then padding to <see cref="MaxLength"/>.</summary>
    public int[] Encode(string text)
    {
        var tokens = EncodeTokens(text);
        int keep = Math.Min(tokens.Length, MaxLength - 2);
        var ids = new int[MaxLength];
        ids[0] = BosId;
        Array.Copy(tokens, 0, ids, 1, keep);
        ids[keep + 1] = EosId;
        for (int i = keep + 2; i < MaxLength; i++)
            ids[i] = PadId;
        return ids;
    }

    /// <summary>The token string of an id.</summary>
    public string IdToToken(int id) =>
        id >= 0 && id < _idToToken.Length && _idToToken[id] is { } t ? t : throw new ArgumentOutOfRangeException(nameof(id), id, "not in the vocabulary");

    /// <summary>Decodes ids back to text ('&lt;/w&gt;' becomes a space; special tokens are skipped).</summary>
    public string Decode(IEnumerable<int> ids)
    {
        var bytes = new List<byte>();
        foreach (var id in ids)
        {
            if (id == BosId || id == EosId || id == PadId) continue;
            var token = IdToToken(id).Replace(EndOfWord, " ", StringComparison.Ordinal);
            foreach (var ch in token)
            {
                if (ch == ' ') bytes.Add((byte)' ');
                else if (_unicodeToByte.TryGetValue(ch, out var b)) bytes.Add(b);
            }
        }
        return Encoding.UTF8.GetString(bytes.ToArray()).Trim();
    }

    /// <summary>The BPE merge loop on one pre-tokenized word (already byte-unicode mapped), cached per word.</summary>
    string[] Bpe(string token)
    {
        lock (_cacheLock)
            if (_cache.TryGetValue(token, out var cached))
                return cached;

        var word = new List<string>(token.Length);
        for (int i = 0; i < token.Length - 1; i++)
            word.Add(token[i].ToString());
        word.Add(token[^1] + EndOfWord);

        while (word.Count > 1)
        {
            int bestRank = int.MaxValue;
            (string, string) best = default;
            for (int i = 0; i < word.Count - 1; i++)
            {
                if (_mergeRanks.TryGetValue((word[i], word[i + 1]), out var rank) && rank < bestRank)
                {
                    bestRank = rank;
                    best = (word[i], word[i + 1]);
                }
            }
            if (bestRank == int.MaxValue) break;

            var merged = new List<string>(word.Count);
            for (int i = 0; i < word.Count;)
            {
                if (i < word.Count - 1 && word[i] == best.Item1 && word[i + 1] == best.Item2)
                {
                    merged.Add(best.Item1 + best.Item2);
                    i += 2;
                }
                else
                {
                    merged.Add(word[i]);
                    i++;
                }
            }
            word = merged;
        }

        var result = word.ToArray();
        lock (_cacheLock)
        {
            if (_cache.Count > 100_000) _cache.Clear();
            _cache[token] = result;
        }
        return result;
    }
}
