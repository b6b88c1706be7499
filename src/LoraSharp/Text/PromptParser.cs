using System.Globalization;
using System.Text.RegularExpressions;

namespace LoraSharp.Text;

/// <summary>A piece of prompt text with its emphasis weight, or a BREAK marker (forces a new 75-token chunk).</summary>
public sealed record PromptFragment(string Text, double Weight, bool IsBreak = false)
{
    public static PromptFragment Break { get; } = new("BREAK", -1, IsBreak: true);

    public override string ToString() => IsBreak ? "BREAK" : $"({Text}:{Weight.ToString("0.####", CultureInfo.InvariantCulture)})";
}

/// <summary>An A1111 extra-network tag <c>&lt;kind:arg1:arg2:name=value&gt;</c>, split into positional and named arguments.</summary>
public sealed record ExtraNetworkTag(string Kind, IReadOnlyList<string> Positional, IReadOnlyDictionary<string, string> Named, string RawText);

/// <summary>
/// A LoRA requested in the prompt. <see cref="TextEncoderWeight"/> multiplies the text-encoder modules,
/// <see cref="UNetWeight"/> the UNet modules (defaults to the TE weight), <see cref="DynamicDim"/> is DyLoRA's rank,
/// <see cref="BlockWeights"/> is a LoRA Block Weight preset name or comma-separated vector, kept as written.
/// </summary>
public sealed record LoraRequest(
    string Name,
    double TextEncoderWeight,
    double UNetWeight,
    int? DynamicDim = null,
    string? BlockWeights = null,
    string Kind = "lora",
    IReadOnlyDictionary<string, string>? ExtraArgs = null);

/// <summary>
/// A parsed prompt: the text without extra-network tags, its emphasis fragments (with BREAK markers), the LoRA
/// requests and any other extra-network tags (removed from the text like A1111 does), and problems found (a bad
/// weight in a LoRA tag, for example) — the parser never throws on user text; <see cref="ThrowIfInvalid"/> does.
/// </summary>
public sealed record ParsedPrompt(
    string Text,
    IReadOnlyList<PromptFragment> Fragments,
    IReadOnlyList<LoraRequest> Loras,
    IReadOnlyList<ExtraNetworkTag> OtherNetworks,
    IReadOnlyList<string> Problems)
{
    public void ThrowIfInvalid()
    {
        if (Problems.Count > 0)
            throw new LoraSharpException("prompt: " + string.Join("; ", Problems), key: "prompt");
    }
}

/// <summary>
/// AUTOMATIC1111's prompt syntax (modules/prompt_parser.py parse_prompt_attention, modules/extra_networks.py,
/// the built-in Lora extension's argument rules):
/// <list type="bullet">
/// <item><c>(text)</c> ×1.1, <c>((text))</c> ×1.21, <c>[text]</c> ÷1.1, <c>(text:1.3)</c> explicit weight; unclosed brackets still apply to the rest</item>
/// <item>escapes <c>\(</c> <c>\)</c> <c>\[</c> <c>\]</c> <c>\\</c> and (LoraSharp addition) <c>\:</c>; a lone backslash is dropped</item>
/// <item><c>BREAK</c> (upper-case, a whole word) starts a new chunk</item>
/// <item><c>&lt;lora:NAME:TE:UNET:DYN&gt;</c>, named <c>te=</c> <c>unet=</c> <c>dyn=</c> <c>lbw=</c>; <c>&lt;lyco:…&gt;</c> is the same; a non-numeric
/// 3rd/4th field is a LoRA Block Weight preset (the extension's old syntax)</item>
/// </list>
/// </summary>
public static partial class PromptParser
{
    public const double RoundBracketMultiplier = 1.1;
    public const double SquareBracketMultiplier = 1 / 1.1;

    [GeneratedRegex(@"\\\(|\\\)|\\\[|\\\]|\\\\|\\:|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:", RegexOptions.CultureInvariant)]
    private static partial Regex Attention();

    [GeneratedRegex(@"\s*\bBREAK\b\s*", RegexOptions.Singleline | RegexOptions.CultureInvariant)]
    private static partial Regex BreakWord();

    [GeneratedRegex(@"<(\w+):([^>]+)>", RegexOptions.CultureInvariant)]
    private static partial Regex ExtraNetwork();

    /// <summary>Parses a full prompt: extra-network tags first (removed from the text), then emphasis.</summary>
    /// <param name="defaultMultiplier">LoRA weight when the tag has none (A1111's "default multiplier", 1.0).</param>
    /// <param name="parseEmphasis">false = A1111's emphasis mode "None": the text is taken literally with weight 1.</param>
    public static ParsedPrompt Parse(string prompt, double defaultMultiplier = 1.0, bool parseEmphasis = true)
    {
        var problems = new List<string>();
        var (text, tags) = ExtractExtraNetworks(prompt);
        var loras = new List<LoraRequest>();
        var others = new List<ExtraNetworkTag>();
        foreach (var tag in tags)
        {
            if (tag.Kind is "lora" or "lyco")
            {
                var request = ToLoraRequest(tag, defaultMultiplier, problems);
                if (request is not null) loras.Add(request);
            }
            else
            {
                others.Add(tag);
            }
        }
        var fragments = parseEmphasis ? ParseAttention(text) : [new PromptFragment(text, 1.0)];
        return new ParsedPrompt(text, fragments, loras, others, problems);
    }

    /// <summary>Finds every <c>&lt;kind:args&gt;</c> tag and returns the text with the tags removed.</summary>
    public static (string Text, IReadOnlyList<ExtraNetworkTag> Tags) ExtractExtraNetworks(string prompt)
    {
        var tags = new List<ExtraNetworkTag>();
        var text = ExtraNetwork().Replace(prompt, m =>
        {
            var positional = new List<string>();
            var named = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (var item in m.Groups[2].Value.Split(':'))
            {
                // A1111: item.split('=', 2) — exactly two parts make a named argument.
                var parts = item.Split('=', 3);
                if (parts.Length == 2) named[parts[0].Trim()] = parts[1].Trim();
                else positional.Add(item.Trim());
            }
            tags.Add(new ExtraNetworkTag(m.Groups[1].Value, positional, named, m.Value));
            return "";
        });
        return (text, tags);
    }

    static LoraRequest? ToLoraRequest(ExtraNetworkTag tag, double defaultMultiplier, List<string> problems)
    {
        var p = tag.Positional;
        if (p.Count == 0 || p[0].Length == 0)
        {
            problems.Add($"{tag.RawText}: missing LoRA name");
            return null;
        }
        string name = p[0];
        bool ok = true;
        string? lbw = null;

        double te = defaultMultiplier;
        if (p.Count > 1 && !TryNumber(p[1], out te)) { problems.Add($"{tag.RawText}: weight '{p[1]}' is not a number"); ok = false; }
        if (tag.Named.TryGetValue("te", out var teText) && !TryNumber(teText, out te)) { problems.Add($"{tag.RawText}: te '{teText}' is not a number"); ok = false; }

        double unet = te;
        if (p.Count > 2)
        {
            if (!TryNumber(p[2], out unet)) { unet = te; lbw = p[2]; }
        }
        if (tag.Named.TryGetValue("unet", out var unetText) && !TryNumber(unetText, out unet)) { problems.Add($"{tag.RawText}: unet '{unetText}' is not a number"); ok = false; }

        int? dyn = null;
        if (p.Count > 3)
        {
            if (int.TryParse(p[3], NumberStyles.Integer, CultureInfo.InvariantCulture, out var d)) dyn = d;
            else if (lbw is null) lbw = p[3];
            else { problems.Add($"{tag.RawText}: dyn '{p[3]}' is not an integer"); ok = false; }
        }
        if (p.Count > 4) { problems.Add($"{tag.RawText}: too many fields (expected name:te:unet:dyn)"); ok = false; }
        if (tag.Named.TryGetValue("dyn", out var dynText))
        {
            if (int.TryParse(dynText, NumberStyles.Integer, CultureInfo.InvariantCulture, out var d)) dyn = d;
            else { problems.Add($"{tag.RawText}: dyn '{dynText}' is not an integer"); ok = false; }
        }
        if (tag.Named.TryGetValue("lbw", out var lbwText)) lbw = lbwText;

        var extra = tag.Named.Where(kv => kv.Key is not ("te" or "unet" or "dyn" or "lbw")).ToDictionary(kv => kv.Key, kv => kv.Value);
        return ok ? new LoraRequest(name, te, unet, dyn, lbw, tag.Kind, extra) : null;
    }

    /// <summary>Python float(): optional sign, digits with at most one '.', optional exponent, surrounding spaces.</summary>
    static bool TryNumber(string s, out double value) =>
        double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out value) && double.IsFinite(value);

    /// <summary>
    /// A1111's parse_prompt_attention: the text split into (text, weight) fragments with BREAK markers; neighbours
    /// with equal weights are merged; an empty prompt gives one empty fragment of weight 1.
    /// </summary>
    public static IReadOnlyList<PromptFragment> ParseAttention(string text)
    {
        var res = new List<(string Text, double Weight, bool IsBreak)>();
        var round = new Stack<int>();
        var square = new Stack<int>();

        void MultiplyRange(int start, double multiplier)
        {
            for (int p = start; p < res.Count; p++)
                if (!res[p].IsBreak) res[p] = (res[p].Text, res[p].Weight * multiplier, false);
        }

        foreach (Match m in Attention().Matches(text))
        {
            var token = m.Value;
            var weight = m.Groups[1];
            if (token.StartsWith('\\'))
            {
                res.Add((token[1..], 1.0, false));
            }
            else if (token == "(")
            {
                round.Push(res.Count);
            }
            else if (token == "[")
            {
                square.Push(res.Count);
            }
            else if (weight.Success && round.Count > 0 && TryNumber(weight.Value, out var w))
            {
                MultiplyRange(round.Pop(), w);
            }
            else if (token == ")" && round.Count > 0)
            {
                MultiplyRange(round.Pop(), RoundBracketMultiplier);
            }
            else if (token == "]" && square.Count > 0)
            {
                MultiplyRange(square.Pop(), SquareBracketMultiplier);
            }
            else
            {
                var parts = BreakWord().Split(token);
                for (int i = 0; i < parts.Length; i++)
                {
                    if (i > 0) res.Add(("BREAK", -1, true));
                    res.Add((parts[i], 1.0, false));
                }
            }
        }

        // Unclosed brackets apply to the rest of the prompt (innermost last, as A1111 iterates the list in order).
        foreach (var pos in round.Reverse()) MultiplyRange(pos, RoundBracketMultiplier);
        foreach (var pos in square.Reverse()) MultiplyRange(pos, SquareBracketMultiplier);

        if (res.Count == 0) res.Add(("", 1.0, false));

        for (int i = 0; i + 1 < res.Count;)
        {
            if (!res[i].IsBreak && !res[i + 1].IsBreak && res[i].Weight == res[i + 1].Weight)
            {
                res[i] = (res[i].Text + res[i + 1].Text, res[i].Weight, false);
                res.RemoveAt(i + 1);
            }
            else
            {
                i++;
            }
        }
        return res.Select(r => r.IsBreak ? PromptFragment.Break : new PromptFragment(r.Text, r.Weight)).ToList();
    }
}
