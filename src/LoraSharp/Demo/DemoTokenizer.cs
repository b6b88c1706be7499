using LoraSharp.Text;
using System.Text;
using System.Text.Json;

namespace LoraSharp.Demo;

/// <summary>
/// A small CLIP-format BPE tokenizer for the demo model (vocab.json + merges.txt, read by
/// <see cref="Text.ClipTokenizer.FromFolder"/>): CLIP's 256 byte symbols and their end-of-word forms (so any text
/// tokenizes), then merges learned by plain BPE on the demo's words until each is one token, then
/// &lt;|startoftext|&gt; and &lt;|endoftext|&gt; as the last two ids (as in CLIP, where EOS has the largest id).
/// </summary>
public static class DemoTokenizer
{
    const string EndOfWord = "</w>";

    /// <summary>Learns merges (most frequent pair first, ties by ordinal order) until every word is one symbol.</summary>
    public static List<(string A, string B)> LearnMerges(IEnumerable<string> words)
    {
        var b2u = ClipTokenizer.BuildByteToUnicode();
        var symbols = words.Distinct(StringComparer.Ordinal).OrderBy(w => w, StringComparer.Ordinal).Select(w =>
        {
            var chars = Encoding.UTF8.GetBytes(w.ToLowerInvariant()).Select(b => b2u[b]).ToList();
            chars[^1] += EndOfWord;
            return chars;
        }).Where(s => s.Count > 0).ToList();
        return LearnMergesOfSymbols(symbols);
    }

    /// <summary>
    /// Greedy BPE on whole words: repeatedly merges the most frequent adjacent pair (ties: ordinal order) until every
    /// word is one symbol; <paramref name="symbols"/> (one list of symbols per word) is consumed. Deterministic.
    /// </summary>
    internal static List<(string A, string B)> LearnMergesOfSymbols(List<List<string>> symbols)
    {
        var merges = new List<(string, string)>();
        while (true)
        {
            var counts = new Dictionary<(string, string), int>();
            foreach (var s in symbols)
                for (int i = 0; i + 1 < s.Count; i++)
                    counts[(s[i], s[i + 1])] = counts.GetValueOrDefault((s[i], s[i + 1])) + 1;
            if (counts.Count == 0) break;
            var best = counts.OrderByDescending(kv => kv.Value).ThenBy(kv => kv.Key.Item1, StringComparer.Ordinal).ThenBy(kv => kv.Key.Item2, StringComparer.Ordinal).First().Key;
            merges.Add(best);
            foreach (var s in symbols)
                for (int i = 0; i + 1 < s.Count; i++)
                    if (s[i] == best.Item1 && s[i + 1] == best.Item2) { s[i] += s[i + 1]; s.RemoveAt(i + 1); }
        }
        return merges;
    }

    /// <summary>Writes vocab.json and merges.txt into <paramref name="folder"/>; returns the vocabulary size.</summary>
    public static int Write(string folder, IEnumerable<string> words)
    {
        Directory.CreateDirectory(folder);
        var b2u = ClipTokenizer.BuildByteToUnicode();
        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        void Add(string token) { if (!vocab.ContainsKey(token)) vocab[token] = vocab.Count; }
        foreach (var s in b2u) Add(s);
        foreach (var s in b2u) Add(s + EndOfWord);
        var merges = LearnMerges(words);
        foreach (var (a, b) in merges) Add(a + b);
        Add(Text.ClipTokenizer.StartOfText);
        Add(Text.ClipTokenizer.EndOfText);
        var json = JsonSerializer.Serialize(vocab, new JsonSerializerOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping });
        File.WriteAllText(Path.Combine(folder, "vocab.json"), json);
        var sb = new StringBuilder("#version: 0.2 (LoraSharp demo tokenizer: CLIP byte symbols + BPE merges of the demo words)\n");
        foreach (var (a, b) in merges) sb.Append(a).Append(' ').Append(b).Append('\n');
        File.WriteAllText(Path.Combine(folder, "merges.txt"), sb.ToString());
        return vocab.Count;
    }
}
