using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraSharp.Imaging;

namespace LoraSharp.Cli.Commands;

/// <summary>
/// <c>lorasharp png-info FILE [--json]</c>: prints the A1111 generation parameters stored in a PNG.
/// Exit codes: 0 parameters printed, 1 the PNG has no parameters, 2 the file is missing or not a valid PNG.
/// </summary>
public static class PngInfoCommand
{
    public static Command Create()
    {
        var file = new Argument<string>("file") { Description = "PNG file written by LoraSharp, A1111 or another tool that stores a 'parameters' text chunk." };
        var json = new Option<bool>("--json") { Description = "Print a JSON object {prompt, negative_prompt, settings, raw} instead of text. Default: text." };
        var command = new Command("png-info", "Show the prompt, negative prompt and generation settings stored in a PNG.") { file, json };
        command.SetAction(result => Run(result.GetValue(file)!, result.GetValue(json), Console.Out, Console.Error));
        return command;
    }

    public static int Run(string path, bool json, TextWriter stdout, TextWriter stderr)
    {
        IReadOnlyDictionary<string, string> texts;
        try
        {
            if (!File.Exists(path))
                throw new LoraSharpException("file not found", path);
            texts = PngText.Read(path);
        }
        catch (LoraSharpException e)
        {
            stderr.WriteLine($"error: {e.Message}");
            return 2;
        }

        if (!texts.TryGetValue(GenerationParameters.PngKeyword, out var raw))
        {
            if (json) stdout.WriteLine("null");
            stderr.WriteLine($"{path}: no generation parameters (no '{GenerationParameters.PngKeyword}' text chunk)");
            return 1;
        }

        var p = GenerationParameters.Parse(raw);
        if (json)
        {
            var settings = new JsonObject();
            foreach (var (k, v) in p.Settings) settings[k] = v;
            var o = new JsonObject
            {
                ["prompt"] = p.Prompt,
                ["negative_prompt"] = p.NegativePrompt,
                ["settings"] = settings,
                ["raw"] = raw,
            };
            stdout.WriteLine(o.ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }));
            return 0;
        }

        stdout.WriteLine($"Prompt: {p.Prompt}");
        stdout.WriteLine($"Negative prompt: {p.NegativePrompt}");
        foreach (var (k, v) in p.Settings) stdout.WriteLine($"{k}: {v}");
        return 0;
    }
}
