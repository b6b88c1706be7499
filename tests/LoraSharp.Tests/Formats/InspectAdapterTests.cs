using System.Text.Json.Nodes;
using LoraSharp.Cli.Commands;

namespace LoraSharp.Tests.Formats;

/// <summary><c>lorasharp inspect</c> on adapters and checkpoints shows what each is, not only its tensors.</summary>
public class InspectAdapterTests
{
    static (int Code, string Out, string Err) Inspect(string path, bool json = false)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int code = InspectCommand.Run(path, all: false, limit: 5, json: json, output, error);
        return (code, output.ToString(), error.ToString());
    }

    [Fact]
    public void Kohya_locon_shows_layout_ranks_alphas_scales_base_and_hashes()
    {
        var (code, output, _) = Inspect(FormatsFixtures.SdPath("lora/kohya_locon.safetensors"));
        Assert.Equal(0, code);
        Assert.Contains("adapter: Kohya layout, 289 modules, made for SD1.x", output);
        Assert.Contains("│     4 │     2 │   0.5 │     239 │", output.Replace("LoRA      │", ""));
        Assert.Contains("0.25", output);
        Assert.Contains("561315fe671cfe24b600147587616e75fa53cd06db887c52c8d2eb69b080b9f7", output); // sshs_model_hash
    }

    [Fact]
    public void Peft_folder_json_lists_dora_modules_and_the_llama_base()
    {
        var (code, output, _) = Inspect(FormatsFixtures.LlmPath("adapters/dora"), json: true);
        Assert.Equal(0, code);
        var adapter = JsonNode.Parse(output)!["adapter"]!;
        Assert.Equal("Llama", adapter["base"]!["family"]!.GetValue<string>());
        var modules = adapter["modules"]!.AsArray();
        Assert.Equal(6, modules.Count);
        Assert.All(modules, m => Assert.True(m!["dora"]!.GetValue<bool>()));
        Assert.All(modules, m => Assert.Equal(2.0, m!["scale"]!.GetValue<double>()));
    }

    [Fact]
    public void Single_file_checkpoint_names_its_family_and_components()
    {
        var (code, output, _) = Inspect(FormatsFixtures.SdPath("model/tiny_sd15.safetensors"));
        Assert.Equal(0, code);
        Assert.Contains("Family: Stable Diffusion 1.x", output);
        Assert.Contains("ldm single file", output);
        Assert.DoesNotContain("adapter:", output);
    }

    [Fact]
    public void Diffusers_folder_is_described()
    {
        var (code, output, _) = Inspect(FormatsFixtures.SdPath("model/diffusers"));
        Assert.Equal(0, code);
        Assert.Contains("Layout: diffusers folder", output);
    }

    [Fact]
    public void Hugging_face_model_folder_shows_its_config_weights_and_tokenizer_files()
    {
        var folder = FormatsFixtures.LlmPath("model");
        var (code, output, err) = Inspect(folder);
        Assert.True(code == 0, err);
        var config = LoraSharp.Models.Llama.LlamaConfig.Load(Path.Combine(folder, "config.json"));
        Assert.Contains("Hugging Face model folder", output);
        Assert.Contains($"{config.NumHiddenLayers} layers, hidden {config.HiddenSize}", output);
        Assert.Contains("weights: model.safetensors", output);
        Assert.Contains("tokenizer.model", output);
        Assert.Contains("model.layers.0.", output); // the weight file's tensor table follows
    }
}
